/*
 * chat_dataset.c — tuning datasets from JSONL (SFT messages or
 * prompt/completion, preferences, prompts with answers): validation of
 * every line, rendering through the chat template with loss masks,
 * truncation, and packing of short examples into full rows with document
 * boundaries kept. Record formats and contracts are in kiln.h.
 */
#include "base/base.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

typedef struct ex_rec {
    size_t ids, n;      /* offset into ds->ids / ds->mask */
    size_t ch, n_ch;    /* chosen */
    size_t rj, n_rj;    /* rejected */
    char *answer;
    int64_t line;
} ex_rec;

struct kiln_dataset {
    kiln_dataset_kind kind;
    ex_rec *ex;
    size_t n_ex, cap_ex;
    int32_t *ids;
    uint8_t *mask;
    size_t n_ids, cap_ids;
    int32_t eot;
    kiln_dataset_stats st;
};

kiln_dataset_opts kiln_dataset_opts_default(void)
{
    return (kiln_dataset_opts){.max_len = 0, .skip_bad = false};
}

typedef struct loader {
    kiln_ctx *ctx;
    const kiln_tokenizer *tok;
    const char *path;
    int64_t line;
    int64_t bad;
    char first[512];
    bool oom;
} loader;

static void bad_line(loader *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bad_line(loader *L, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    kiln_log(L->ctx, KILN_LOG_ERROR, "%s:%lld: %s", L->path, (long long)L->line, msg);
    if (L->bad++ == 0) snprintf(L->first, sizeof L->first, "line %lld: %s", (long long)L->line, msg);
}

/* Appends ids (and mask) to the dataset's buffers; returns the offset. */
static size_t push_ids(kiln_dataset *ds, loader *L, const int32_t *ids, const uint8_t *mask,
                       size_t n)
{
    if (ds->n_ids + n > ds->cap_ids) {
        size_t cap = ds->cap_ids ? 2 * ds->cap_ids : 1 << 16;
        while (cap < ds->n_ids + n) cap *= 2;
        int32_t *a = realloc(ds->ids, cap * sizeof *a);
        if (a) ds->ids = a;
        uint8_t *m = realloc(ds->mask, cap);
        if (m) ds->mask = m;
        if (!a || !m) { L->oom = true; return 0; }
        ds->cap_ids = cap;
    }
    size_t off = ds->n_ids;
    memcpy(ds->ids + off, ids, n * sizeof *ids);
    if (mask) memcpy(ds->mask + off, mask, n);
    else memset(ds->mask + off, 0, n);
    ds->n_ids += n;
    return off;
}

static ex_rec *new_ex(kiln_dataset *ds, loader *L)
{
    if (ds->n_ex == ds->cap_ex) {
        size_t cap = ds->cap_ex ? 2 * ds->cap_ex : 1024;
        ex_rec *e = realloc(ds->ex, cap * sizeof *e);
        if (!e) { L->oom = true; return NULL; }
        ds->ex = e;
        ds->cap_ex = cap;
    }
    ex_rec *e = &ds->ex[ds->n_ex];
    memset(e, 0, sizeof *e);
    e->line = L->line;
    return e;
}

/* Validates a messages array into msgs (pointing into v). Returns the
 * count, or -1 after reporting. need_assistant: at least one assistant
 * message must be present. */
static int parse_messages(loader *L, const json_t *v, const char *field, kiln_chat_msg **msgs,
                          bool need_assistant)
{
    if (!json_is_array(v)) {
        bad_line(L, "field \"%s\" must be an array of {\"role\", \"content\"} messages", field);
        return -1;
    }
    size_t n = json_array_size(v);
    if (n == 0) {
        bad_line(L, "field \"%s\" is an empty array", field);
        return -1;
    }
    kiln_chat_msg *m = calloc(n, sizeof *m);
    if (!m) { L->oom = true; return -1; }
    bool has_asst = false;
    static const char *roles[] = {"system", "user", "assistant", "tool"};
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(v, i);
        if (!json_is_object(e)) {
            bad_line(L, "%s[%zu] must be an object with \"role\" and \"content\"", field, i);
            free(m);
            return -1;
        }
        const json_t *r = json_object_get(e, "role"), *c = json_object_get(e, "content");
        if (!r) { bad_line(L, "%s[%zu]: field \"role\" is missing", field, i); free(m); return -1; }
        if (!json_is_string(r)) { bad_line(L, "%s[%zu]: field \"role\" must be a string", field, i); free(m); return -1; }
        bool known = false;
        for (int k = 0; k < 4; k++) known |= !strcmp(json_string_value(r), roles[k]);
        if (!known) {
            bad_line(L, "%s[%zu]: unknown role \"%.40s\" (expected system, user, assistant or tool)",
                     field, i, json_string_value(r));
            free(m);
            return -1;
        }
        if (!c) { bad_line(L, "%s[%zu]: field \"content\" is missing", field, i); free(m); return -1; }
        if (!json_is_string(c)) { bad_line(L, "%s[%zu]: field \"content\" must be a string", field, i); free(m); return -1; }
        if (json_string_length(c) == 0) { bad_line(L, "%s[%zu]: \"content\" is empty", field, i); free(m); return -1; }
        m[i].role = json_string_value(r);
        m[i].content = json_string_value(c);
        has_asst |= !strcmp(m[i].role, "assistant");
    }
    if (need_assistant && !has_asst) {
        bad_line(L, "field \"%s\" has no assistant message (nothing to learn)", field);
        free(m);
        return -1;
    }
    *msgs = m;
    return (int)n;
}

static bool get_string(loader *L, const json_t *obj, const char *key, const char **out)
{
    const json_t *v = json_object_get(obj, key);
    if (!v) { bad_line(L, "field \"%s\" is missing", key); return false; }
    if (!json_is_string(v)) { bad_line(L, "field \"%s\" must be a string", key); return false; }
    if (json_string_length(v) == 0) { bad_line(L, "field \"%s\" is empty", key); return false; }
    *out = json_string_value(v);
    return true;
}

/* A chat that does not render (a template's raise_exception, a template
 * error at run time) is a bad line with the template's message. */
static void render_failed(loader *L, kiln_status s)
{
    if (s == KILN_ERR_NOMEM) {
        L->oom = true;
        return;
    }
    char msg[600];
    snprintf(msg, sizeof msg, "%s", kiln_errmsg(L->ctx));
    bad_line(L, "%s", msg);
}

/* Encodes a prompt (string or messages). *chat says which. */
static bool encode_prompt(loader *L, const json_t *obj, int32_t **ids, size_t *n, bool *chat)
{
    const json_t *p = json_object_get(obj, "prompt");
    if (!p) { bad_line(L, "field \"prompt\" is missing"); return false; }
    kiln_status s;
    if (json_is_array(p)) {
        kiln_chat_msg *m;
        int k = parse_messages(L, p, "prompt", &m, false);
        if (k < 0) return false;
        s = kiln_chat_render(L->ctx, L->tok, m, k, true, ids, NULL, n);
        free(m);
        *chat = true;
    } else if (json_is_string(p)) {
        if (json_string_length(p) == 0) { bad_line(L, "field \"prompt\" is empty"); return false; }
        s = kiln_tokenizer_encode(L->ctx, L->tok, json_string_value(p), json_string_length(p), ids, n);
        *chat = false;
    } else {
        bad_line(L, "field \"prompt\" must be a string or a messages array");
        return false;
    }
    if (s) { render_failed(L, s); return false; }
    return true;
}

/* Encodes a completion (string or [one assistant message]) plus the end. */
static bool encode_completion(loader *L, const json_t *obj, const char *key, bool chat,
                              int32_t **ids, size_t *n)
{
    const json_t *v = json_object_get(obj, key);
    const char *text = NULL;
    size_t len = 0;
    if (!v) { bad_line(L, "field \"%s\" is missing", key); return false; }
    if (json_is_string(v)) {
        text = json_string_value(v);
        len = json_string_length(v);
    } else if (json_is_array(v)) {
        kiln_chat_msg *m;
        int k = parse_messages(L, v, key, &m, true);
        if (k < 0) return false;
        if (k != 1) {
            bad_line(L, "field \"%s\" must hold exactly one assistant message", key);
            free(m);
            return false;
        }
        text = m[0].content;
        len = strlen(text);
        free(m);
    } else {
        bad_line(L, "field \"%s\" must be a string or an array with one assistant message", key);
        return false;
    }
    if (len == 0) { bad_line(L, "field \"%s\" is empty", key); return false; }
    int32_t *a;
    size_t na;
    if (kiln_tokenizer_encode(L->ctx, L->tok, text, len, &a, &na)) { L->oom = true; return false; }
    int32_t *b = realloc(a, (na + 1) * sizeof *b);
    if (!b) { free(a); L->oom = true; return false; }
    b[na] = chat ? kiln_chat_stop_id(L->tok) : kiln_tokenizer_eot(L->tok);
    *ids = b;
    *n = na + 1;
    return true;
}

static void load_sft(kiln_dataset *ds, loader *L, const json_t *obj, int max_len)
{
    int32_t *ids = NULL;
    uint8_t *mask = NULL;
    size_t n = 0;
    const json_t *msgs = json_object_get(obj, "messages");
    if (msgs) {
        kiln_chat_msg *m;
        int k = parse_messages(L, msgs, "messages", &m, true);
        if (k < 0) return;
        kiln_status s = kiln_chat_render(L->ctx, L->tok, m, k, false, &ids, &mask, &n);
        free(m);
        if (s) { render_failed(L, s); return; }
    } else if (json_object_get(obj, "prompt") || json_object_get(obj, "completion")) {
        const char *p, *c;
        if (!get_string(L, obj, "prompt", &p) || !get_string(L, obj, "completion", &c)) return;
        int32_t *a, *b;
        size_t na, nb;
        if (kiln_tokenizer_encode(L->ctx, L->tok, p, strlen(p), &a, &na)) { L->oom = true; return; }
        if (kiln_tokenizer_encode(L->ctx, L->tok, c, strlen(c), &b, &nb)) { free(a); L->oom = true; return; }
        n = na + nb + 1;
        ids = malloc(n * sizeof *ids);
        mask = malloc(n);
        if (ids && mask) {
            memcpy(ids, a, na * sizeof *ids);
            memcpy(ids + na, b, nb * sizeof *ids);
            ids[n - 1] = ds->eot;
            memset(mask, 0, na);
            memset(mask + na, 1, nb + 1);
        } else L->oom = true;
        free(a);
        free(b);
        if (L->oom) { free(ids); free(mask); return; }
    } else {
        bad_line(L, "needs \"messages\" (a chat) or \"prompt\" and \"completion\"");
        return;
    }
    if (max_len > 0 && n > (size_t)max_len) {
        n = (size_t)max_len;
        ds->st.truncated++;
    }
    int64_t loss = 0;
    for (size_t i = 1; i < n; i++) loss += mask[i]; /* the first token is never predicted */
    if (loss == 0) {
        ds->st.dropped++;
        kiln_log(L->ctx, KILN_LOG_WARN, "%s:%lld: no learned token left within "
                 "kiln_dataset_opts.max_len = %d; "
                 "example dropped", L->path, (long long)L->line, max_len);
    } else {
        ex_rec *e = new_ex(ds, L);
        if (e) {
            e->ids = push_ids(ds, L, ids, mask, n);
            e->n = n;
            if (!L->oom) {
                ds->n_ex++;
                ds->st.tokens += (int64_t)n;
                ds->st.loss_tokens += loss;
            }
        }
    }
    free(ids);
    free(mask);
}

static void load_pref(kiln_dataset *ds, loader *L, const json_t *obj, int max_len)
{
    int32_t *p = NULL, *c = NULL, *r = NULL;
    size_t np = 0, nc = 0, nr = 0;
    bool chat = false;
    bool ok = encode_prompt(L, obj, &p, &np, &chat);
    ok = ok && encode_completion(L, obj, "chosen", chat, &c, &nc);
    ok = ok && encode_completion(L, obj, "rejected", chat, &r, &nr);
    if (ok && max_len > 0 && np + 1 > (size_t)max_len) {
        ds->st.dropped++;
        kiln_log(L->ctx, KILN_LOG_WARN, "%s:%lld: the prompt (%zu tokens) leaves no room within "
                 "kiln_dataset_opts.max_len = %d; example dropped", L->path, (long long)L->line, np, max_len);
        ok = false;
    }
    if (ok) {
        if (max_len > 0 && (np + nc > (size_t)max_len || np + nr > (size_t)max_len)) {
            ds->st.truncated++;
            if (np + nc > (size_t)max_len) nc = (size_t)max_len - np;
            if (np + nr > (size_t)max_len) nr = (size_t)max_len - np;
        }
        ex_rec *e = new_ex(ds, L);
        if (e) {
            e->ids = push_ids(ds, L, p, NULL, np);
            e->n = np;
            e->ch = push_ids(ds, L, c, NULL, nc);
            e->n_ch = nc;
            e->rj = push_ids(ds, L, r, NULL, nr);
            e->n_rj = nr;
            if (!L->oom) {
                ds->n_ex++;
                ds->st.tokens += (int64_t)(np + nc + nr);
            }
        }
    }
    free(p);
    free(c);
    free(r);
}

static void load_prompt(kiln_dataset *ds, loader *L, const json_t *obj, int max_len)
{
    const json_t *a = json_object_get(obj, "answer");
    char *answer = NULL;
    if (!a) { bad_line(L, "field \"answer\" is missing"); return; }
    if (json_is_string(a)) answer = strdup(json_string_value(a));
    else if (json_is_number(a)) answer = json_dumps(a, JSON_ENCODE_ANY);
    else { bad_line(L, "field \"answer\" must be a string or a number"); return; }
    if (!answer) { L->oom = true; return; }
    int32_t *p = NULL;
    size_t np = 0;
    bool chat;
    if (!encode_prompt(L, obj, &p, &np, &chat)) { free(answer); return; }
    if (max_len > 0 && np > (size_t)max_len) {
        ds->st.dropped++;
        kiln_log(L->ctx, KILN_LOG_WARN, "%s:%lld: the prompt (%zu tokens) is longer than "
                 "kiln_dataset_opts.max_len = %d; example dropped", L->path, (long long)L->line, np, max_len);
        free(answer);
        free(p);
        return;
    }
    ex_rec *e = new_ex(ds, L);
    if (e) {
        e->ids = push_ids(ds, L, p, NULL, np);
        e->n = np;
        e->answer = answer;
        answer = NULL;
        if (!L->oom) {
            ds->n_ex++;
            ds->st.tokens += (int64_t)np;
        }
    }
    free(answer);
    free(p);
}

kiln_status kiln_dataset_load(kiln_ctx *ctx, const kiln_tokenizer *tok, const char *path,
                              kiln_dataset_kind kind, const kiln_dataset_opts *opts,
                              kiln_dataset **out)
{
    *out = NULL;
    kiln_dataset_opts o = opts ? *opts : kiln_dataset_opts_default();
    if (kind > KILN_DATASET_PROMPTS)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "unknown dataset kind %d", (int)kind);
    if (o.max_len < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_dataset_opts.max_len = %d must be >= 0",
                         o.max_len);
    if (kiln_tokenizer_eot(tok) < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "the tokenizer has no end-of-text token to end completions with");
    file_map fm;
    kiln_status s = file_map_open(ctx, path, &fm);
    if (s) return s;
    kiln_dataset *ds = kiln_calloc(ctx, 1, sizeof *ds);
    if (!ds) {
        file_map_close(&fm);
        return KILN_ERR_NOMEM;
    }
    ds->kind = kind;
    ds->eot = kiln_tokenizer_eot(tok);
    loader L = {.ctx = ctx, .tok = tok, .path = path};
    const char *p = (const char *)fm.data, *end = p + fm.size;
    while (p < end && !L.oom) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        L.line++;
        bool blank = true;
        for (const char *q = p; q < le && blank; q++)
            blank = *q == ' ' || *q == '\t' || *q == '\r';
        if (!blank) {
            ds->st.lines++;
            json_error_t err;
            json_t *v = json_loadb(p, (size_t)(le - p), JSON_REJECT_DUPLICATES, &err);
            if (!v) bad_line(&L, "invalid JSON at column %d: %s", err.column, err.text);
            else if (!json_is_object(v)) bad_line(&L, "expected a JSON object");
            else if (kind == KILN_DATASET_SFT) load_sft(ds, &L, v, o.max_len);
            else if (kind == KILN_DATASET_PREFERENCE) load_pref(ds, &L, v, o.max_len);
            else load_prompt(ds, &L, v, o.max_len);
            json_decref(v);
        }
        p = le + 1;
    }
    file_map_close(&fm);
    ds->st.bad_lines = L.bad;
    ds->st.examples = (int64_t)ds->n_ex;
    if (L.oom) s = kiln_fail(ctx, KILN_ERR_NOMEM, "%s: out of memory loading the dataset", path);
    else if (L.bad && !o.skip_bad)
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "%s: %lld malformed line%s (each logged; first: %s); fix them or "
                      "skip them with kiln_dataset_opts.skip_bad", path, (long long)L.bad,
                      L.bad == 1 ? "" : "s", L.first);
    else if (ds->n_ex == 0)
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: no usable examples (%lld lines read)", path,
                      (long long)ds->st.lines);
    if (s) {
        kiln_dataset_free(ds);
        return s;
    }
    *out = ds;
    return KILN_OK;
}

void kiln_dataset_free(kiln_dataset *ds)
{
    if (!ds) return;
    for (size_t i = 0; i < ds->n_ex; i++) free(ds->ex[i].answer);
    free(ds->ex);
    free(ds->ids);
    free(ds->mask);
    free(ds);
}

size_t kiln_dataset_count(const kiln_dataset *ds) { return ds->n_ex; }

kiln_dataset_kind kiln_dataset_kind_of(const kiln_dataset *ds) { return ds->kind; }

void kiln_dataset_get(const kiln_dataset *ds, size_t i, kiln_example *ex)
{
    KILN_ASSERT(i < ds->n_ex);
    const ex_rec *e = &ds->ex[i];
    memset(ex, 0, sizeof *ex);
    ex->ids = ds->ids + e->ids;
    ex->mask = ds->mask + e->ids;
    ex->n = e->n;
    if (ds->kind == KILN_DATASET_PREFERENCE) {
        ex->chosen = ds->ids + e->ch;
        ex->n_chosen = e->n_ch;
        ex->rejected = ds->ids + e->rj;
        ex->n_rejected = e->n_rj;
    }
    ex->answer = e->answer;
    ex->line = e->line;
}

void kiln_dataset_get_stats(const kiln_dataset *ds, kiln_dataset_stats *st) { *st = ds->st; }

/* ---- packing -------------------------------------------------------- */

#define OPEN_ROWS 16

static size_t last_run(const uint8_t *m, size_t n);

/* The loss rule of kiln_dataset_rows and kiln_dataset_pack_rows, in two
 * parts: loss_from is where an example's learned targets may start (mask m,
 * n ids; KILN_LOSS_ON_COMPLETION: the last run of the mask only, the whole
 * example's before any cut to T + 1 tokens), learns whether position j
 * learns its target ids[j + 1]. */
static size_t loss_from(const uint8_t *m, size_t n, kiln_loss_on lo)
{
    size_t from = lo == KILN_LOSS_ON_COMPLETION ? last_run(m, n) : 0;
    return from;
}

static bool learns(const uint8_t *m, size_t j, kiln_loss_on lo, size_t from)
{
    return lo == KILN_LOSS_ON_ALL || (m[j + 1] && j + 1 >= from);
}

/* Row r's padding (doc -1 after its last document) as one document of
 * its own, positions 0, 1, ...: it attends to nothing else and costs one
 * attention call, not one per position. */
static void pad_positions(kiln_packed *pk)
{
    size_t T = (size_t)pk->T;
    for (int64_t r = 0; r < pk->rows; r++)
        for (size_t j = 0, c = (size_t)r * T; j < T; j++, c++)
            if (pk->doc[c] < 0) pk->pos[c] = j > 0 && pk->doc[c - 1] < 0 ? pk->pos[c - 1] + 1 : 0;
}

kiln_status kiln_dataset_pack(kiln_ctx *ctx, const kiln_dataset *ds, int T, kiln_packed **out)
{
    return kiln_dataset_pack_rows(ctx, ds, T, KILN_LOSS_ON_MASK, NULL, 0, out);
}

kiln_status kiln_dataset_pack_rows(kiln_ctx *ctx, const kiln_dataset *ds, int T,
                                   kiln_loss_on loss_on, const size_t *idx, size_t n_idx,
                                   kiln_packed **out)
{
    *out = NULL;
    if (ds->kind != KILN_DATASET_SFT)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "packing needs an SFT dataset");
    if (T < 1) return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "pack: sequence length %d must be >= 1", T);
    if (loss_on != KILN_LOSS_ON_MASK && loss_on != KILN_LOSS_ON_ALL &&
        loss_on != KILN_LOSS_ON_COMPLETION)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_dataset_pack_rows: loss_on = %d is not a kiln_loss_on", (int)loss_on);
    size_t n = idx ? n_idx : ds->n_ex;
    for (size_t r = 0; r < n; r++)
        if (idx && idx[r] >= ds->n_ex)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "kiln_dataset_pack_rows: index %zu (entry %zu) is outside the "
                             "dataset's %zu examples", idx[r], r, ds->n_ex);
    /* plan: row of each example and its offset, first fit over open rows */
    int64_t *row = malloc((n + 1) * sizeof *row);
    int32_t *at = malloc((n + 1) * sizeof *at);
    int64_t open_row[OPEN_ROWS];
    int32_t open_used[OPEN_ROWS];
    int n_open = 0;
    int64_t rows = 0;
    if (!row || !at) {
        free(row);
        free(at);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory packing");
    }
    kiln_packed *pk = kiln_calloc(ctx, 1, sizeof *pk);
    if (!pk) { free(row); free(at); return KILN_ERR_NOMEM; }
    for (size_t r = 0; r < n; r++) {
        size_t len = ds->ex[idx ? idx[r] : r].n;
        if (len < 2) { row[r] = -1; continue; }
        int32_t need = (int32_t)KILN_MIN(len - 1, (size_t)T);
        if (len - 1 > (size_t)T) pk->cut++;
        int k = 0;
        while (k < n_open && open_used[k] + need > T) k++;
        if (k == n_open) {
            if (n_open == OPEN_ROWS) { /* retire the fullest row */
                int f = 0;
                for (int j = 1; j < n_open; j++) if (open_used[j] > open_used[f]) f = j;
                open_row[f] = open_row[n_open - 1];
                open_used[f] = open_used[n_open - 1];
                n_open--;
                k = n_open;
            }
            open_row[k] = rows++;
            open_used[k] = 0;
            n_open++;
        }
        row[r] = open_row[k];
        at[r] = open_used[k];
        open_used[k] += need;
        pk->examples++;
    }
    size_t cells = (size_t)rows * (size_t)T;
    pk->rows = rows;
    pk->T = T;
    pk->tokens = malloc((cells + 1) * sizeof *pk->tokens);
    pk->targets = malloc((cells + 1) * sizeof *pk->targets);
    pk->pos = malloc((cells + 1) * sizeof *pk->pos);
    pk->doc = malloc((cells + 1) * sizeof *pk->doc);
    if (!pk->tokens || !pk->targets || !pk->pos || !pk->doc) {
        free(row);
        free(at);
        kiln_packed_free(pk);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory packing %lld rows", (long long)rows);
    }
    for (size_t c = 0; c < cells; c++) {
        pk->tokens[c] = ds->eot;
        pk->targets[c] = -1;
        pk->pos[c] = 0;
        pk->doc[c] = -1;
    }
    /* document numbers count up within each row in order of offset; as
     * examples enter a row at increasing offsets, a per-row counter works */
    int32_t *next_doc = calloc((size_t)rows + 1, sizeof *next_doc);
    if (!next_doc) {
        free(row);
        free(at);
        kiln_packed_free(pk);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory packing");
    }
    for (size_t r = 0; r < n; r++) {
        if (row[r] < 0) continue;
        const ex_rec *e = &ds->ex[idx ? idx[r] : r];
        const int32_t *ids = ds->ids + e->ids;
        const uint8_t *m = ds->mask + e->ids;
        size_t len = KILN_MIN(e->n - 1, (size_t)T);
        size_t base = (size_t)row[r] * (size_t)T + (size_t)at[r];
        int32_t d = next_doc[row[r]]++;
        size_t from = loss_from(m, e->n, loss_on);
        for (size_t j = 0; j < len; j++) {
            bool learn = learns(m, j, loss_on, from);
            pk->tokens[base + j] = ids[j];
            pk->targets[base + j] = learn ? ids[j + 1] : -1;
            pk->pos[base + j] = (int32_t)j;
            pk->doc[base + j] = d;
        }
    }
    pad_positions(pk);
    free(next_doc);
    free(row);
    free(at);
    *out = pk;
    return KILN_OK;
}

void kiln_packed_free(kiln_packed *p)
{
    if (!p) return;
    free(p->tokens);
    free(p->targets);
    free(p->pos);
    free(p->doc);
    free(p);
}

/* ---- one example per row (SFT without packing) ---------------------- */

/* Start of the last run of 1s in mask[0..n), or n when there is none. */
static size_t last_run(const uint8_t *m, size_t n)
{
    size_t e = n;
    while (e > 0 && !m[e - 1]) e--;
    size_t b = e;
    while (b > 0 && m[b - 1]) b--;
    return e ? b : n;
}

kiln_status kiln_dataset_rows(kiln_ctx *ctx, const kiln_dataset *ds, int T,
                              kiln_loss_on loss_on, const size_t *idx,
                              size_t n_idx, kiln_packed **out)
{
    *out = NULL;
    if (ds->kind != KILN_DATASET_SFT)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_dataset_rows needs an SFT dataset");
    if (T < 0) return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_dataset_rows: T = %d must be >= 0", T);
    if (loss_on != KILN_LOSS_ON_MASK && loss_on != KILN_LOSS_ON_ALL &&
        loss_on != KILN_LOSS_ON_COMPLETION)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_dataset_rows: loss_on = %d is not a kiln_loss_on", (int)loss_on);
    size_t n = idx ? n_idx : ds->n_ex;
    size_t longest = 2;
    for (size_t r = 0; r < n; r++) {
        size_t i = idx ? idx[r] : r;
        if (i >= ds->n_ex)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "kiln_dataset_rows: index %zu (row %zu) is outside the "
                             "dataset's %zu examples", i, r, ds->n_ex);
        longest = KILN_MAX(longest, ds->ex[i].n);
    }
    if (T == 0) T = (int)KILN_MIN(longest - 1, (size_t)INT32_MAX);
    kiln_packed *pk = kiln_calloc(ctx, 1, sizeof *pk);
    if (!pk) return KILN_ERR_NOMEM;
    size_t cells = n * (size_t)T;
    pk->rows = (int64_t)n;
    pk->T = T;
    pk->tokens = malloc((cells + 1) * sizeof *pk->tokens);
    pk->targets = malloc((cells + 1) * sizeof *pk->targets);
    pk->pos = malloc((cells + 1) * sizeof *pk->pos);
    pk->doc = malloc((cells + 1) * sizeof *pk->doc);
    if (!pk->tokens || !pk->targets || !pk->pos || !pk->doc) {
        kiln_packed_free(pk);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory for %zu rows of %d", n, T);
    }
    for (size_t r = 0; r < n; r++) {
        const ex_rec *e = &ds->ex[idx ? idx[r] : r];
        const int32_t *ids = ds->ids + e->ids;
        const uint8_t *m = ds->mask + e->ids;
        size_t len = e->n > 0 ? KILN_MIN(e->n - 1, (size_t)T) : 0;
        if (e->n - 1 > (size_t)T) pk->cut++;
        size_t from = loss_from(m, e->n, loss_on);
        int32_t *tok = pk->tokens + r * (size_t)T, *tg = pk->targets + r * (size_t)T;
        for (size_t j = 0; j < (size_t)T; j++) {
            bool in = j < len;
            bool learn = in && learns(m, j, loss_on, from);
            tok[j] = in ? ids[j] : ds->eot;
            tg[j] = learn ? ids[j + 1] : -1;
            pk->pos[r * (size_t)T + j] = in ? (int32_t)j : 0;
            pk->doc[r * (size_t)T + j] = in ? 0 : -1;
        }
        pk->examples++;
    }
    *out = pk;
    return KILN_OK;
}

/* ---- preference pairs, two rows each (DPO) -------------------------- */

/* One row of a pair: prompt then completion, targets on the completion. */
static void pair_row(const kiln_dataset *ds, const int32_t *p, size_t np, const int32_t *c,
                     size_t nc, int T, int32_t *tok, int32_t *tg, int32_t *pos, int32_t *doc,
                     int64_t *cut)
{
    size_t n = np + nc; /* tokens of the sequence; n-1 positions */
    size_t len = KILN_MIN(n - 1, (size_t)T);
    if (n - 1 > (size_t)T) (*cut)++;
    for (size_t j = 0; j < (size_t)T; j++) {
        bool in = j < len;
        /* position j predicts token j+1; learned when that is a completion token */
        size_t k = j + 1;
        int32_t next = !in ? -1 : k < np ? -1 : c[k - np];
        tok[j] = in ? (j < np ? p[j] : c[j - np]) : ds->eot;
        tg[j] = next;
        pos[j] = in ? (int32_t)j : 0;
        doc[j] = in ? 0 : -1;
    }
}

kiln_status kiln_dataset_pair_rows(kiln_ctx *ctx, const kiln_dataset *ds, int T,
                                   const size_t *idx, size_t n_idx, kiln_packed **out)
{
    *out = NULL;
    if (ds->kind != KILN_DATASET_PREFERENCE)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_dataset_pair_rows needs a preference dataset");
    if (T < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_dataset_pair_rows: T = %d must be >= 0",
                         T);
    size_t n = idx ? n_idx : ds->n_ex;
    size_t longest = 2;
    for (size_t r = 0; r < n; r++) {
        size_t i = idx ? idx[r] : r;
        if (i >= ds->n_ex)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "kiln_dataset_pair_rows: index %zu (pair %zu) is outside the "
                             "dataset's %zu examples", i, r, ds->n_ex);
        const ex_rec *e = &ds->ex[i];
        longest = KILN_MAX(longest, e->n + KILN_MAX(e->n_ch, e->n_rj));
    }
    if (T == 0) T = (int)KILN_MIN(longest - 1, (size_t)INT32_MAX);
    kiln_packed *pk = kiln_calloc(ctx, 1, sizeof *pk);
    if (!pk) return KILN_ERR_NOMEM;
    size_t cells = 2 * n * (size_t)T;
    pk->rows = (int64_t)(2 * n);
    pk->T = T;
    pk->tokens = malloc((cells + 1) * sizeof *pk->tokens);
    pk->targets = malloc((cells + 1) * sizeof *pk->targets);
    pk->pos = malloc((cells + 1) * sizeof *pk->pos);
    pk->doc = malloc((cells + 1) * sizeof *pk->doc);
    if (!pk->tokens || !pk->targets || !pk->pos || !pk->doc) {
        kiln_packed_free(pk);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory for %zu pairs of %d", n, T);
    }
    for (size_t r = 0; r < n; r++) {
        const ex_rec *e = &ds->ex[idx ? idx[r] : r];
        const int32_t *p = ds->ids + e->ids;
        for (int w = 0; w < 2; w++) {
            size_t row = 2 * r + (size_t)w, at = row * (size_t)T;
            const int32_t *c = ds->ids + (w ? e->rj : e->ch);
            size_t nc = w ? e->n_rj : e->n_ch;
            pair_row(ds, p, e->n, c, nc, T, pk->tokens + at, pk->targets + at, pk->pos + at,
                     pk->doc + at, &pk->cut);
        }
        pk->examples++;
    }
    *out = pk;
    return KILN_OK;
}
