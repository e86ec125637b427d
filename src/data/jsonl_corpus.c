/*
 * jsonl_corpus.c — corpus tokenization behind `kiln tokenize`: text files,
 * directories of them and JSONL files in, a data directory of token shards
 * out (layout in kiln.h, kiln_tokenize_corpus).
 *
 * The input is read as a sequence of documents (a text file, a part of one
 * between separator lines, or one JSONL line) and processed in batches:
 * the batch's units (documents, or ~1 MB segments of a large document cut
 * where the tokenizer allows, kiln_tokenizer_split_point) are encoded on
 * all threads, then written in input order, so the output does not depend
 * on the thread count. Each document goes to train or validation by a rule
 * on byte counts alone: validation takes a document when doing so keeps its
 * share of the bytes seen so far within val_fraction.
 */
#include "base/base.h"

#include <errno.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SEG_BYTES (1u << 20)

typedef struct cfile {
    char *path;
    bool jsonl;
    bool mapped;
    file_map map;
    int64_t size;
} cfile;

typedef struct flist {
    cfile *v;
    int n, cap;
} flist;

typedef struct unit {
    const char *p;
    size_t n;
    int file;
    int64_t line;  /* JSONL line number (1-based), 0 for text */
    bool jsonl;
    bool first;    /* first unit of its document: write the eot first */
    bool val;
} unit;

typedef struct result {
    int32_t *ids;
    size_t n;
    char *err;
} result;

typedef struct splitw {
    const char *prefix;
    kiln_shard_writer *w;
    int64_t in_shard, tokens;
    char **names;
    int n_names;
} splitw;

kiln_tokenize_opts kiln_tokenize_opts_default(void)
{
    return (kiln_tokenize_opts){.tokenizer_spec = "bytes",
                                .format = "auto",
                                .field = "text",
                                .val_fraction = 0.0,
                                .shard_tokens = 100000000,
                                .threads = 0};
}

static bool ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

static kiln_status add_file(kiln_ctx *ctx, flist *l, const char *path, int64_t size,
                            const kiln_tokenize_opts *o)
{
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        cfile *v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        l->v = v;
        l->cap = cap;
    }
    cfile *f = &l->v[l->n];
    memset(f, 0, sizeof *f);
    f->path = strdup(path);
    if (!f->path) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    f->size = size;
    if (!strcmp(o->format, "jsonl")) f->jsonl = true;
    else if (!strcmp(o->format, "text")) f->jsonl = false;
    else f->jsonl = ends_with(path, ".jsonl") || strstr(path, ".jsonl.") != NULL;
    l->n++;
    return KILN_OK;
}

typedef struct collect_ud {
    flist *l;
    const kiln_tokenize_opts *o;
} collect_ud;

static kiln_status collect_one(kiln_ctx *ctx, void *ud, const char *path, int64_t size)
{
    collect_ud *c = ud;
    return add_file(ctx, c->l, path, size, c->o);
}

static kiln_status split_append(kiln_ctx *ctx, splitw *sw, const kiln_tokenize_opts *o,
                                int vocab, const int32_t *ids, size_t n)
{
    while (n > 0) {
        if (!sw->w) {
            char name[64];
            snprintf(name, sizeof name, "%s_%04d.bin", sw->prefix, sw->n_names);
            char *path = file_join(o->out_dir, name);
            char **nn = realloc(sw->names, ((size_t)sw->n_names + 1) * sizeof *nn);
            if (!path || !nn) {
                free(path);
                if (nn) sw->names = nn;
                return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            }
            sw->names = nn;
            kiln_status s = kiln_shard_writer_open(ctx, path, vocab, &sw->w);
            free(path);
            if (s) return s;
            sw->names[sw->n_names++] = strdup(name);
            sw->in_shard = 0;
        }
        size_t k = (size_t)(o->shard_tokens - sw->in_shard);
        if (k > n) k = n;
        kiln_status s = kiln_shard_writer_append(ctx, sw->w, ids, k);
        if (s) return s;
        sw->in_shard += (int64_t)k;
        sw->tokens += (int64_t)k;
        ids += k;
        n -= k;
        if (sw->in_shard >= o->shard_tokens) {
            kiln_shard_writer *w = sw->w;
            sw->w = NULL;
            if ((s = kiln_shard_writer_close(ctx, w))) return s;
        }
    }
    return KILN_OK;
}

static void split_cleanup(splitw *sw, const char *dir, bool remove_files)
{
    if (sw->w) kiln_shard_writer_abort(sw->w);
    sw->w = NULL;
    for (int i = 0; i < sw->n_names; i++) {
        if (remove_files && sw->names[i]) {
            char *p = file_join(dir, sw->names[i]);
            if (p) unlink(p);
            free(p);
        }
        free(sw->names[i]);
    }
    free(sw->names);
    sw->names = NULL;
    sw->n_names = 0;
}

/* Reader state over the file list. */
typedef struct reader {
    flist *files;
    int fi;
    size_t off;
    int64_t line;
    int64_t bytes_seen, val_bytes; /* for the split rule */
    const kiln_tokenize_opts *o;
    const kiln_tokenizer *tok;
} reader;

static bool is_blank(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r' && p[i] != '\n') return false;
    return true;
}

static bool decide_val(reader *r, size_t n)
{
    double f = r->o->val_fraction;
    r->bytes_seen += (int64_t)n;
    if (f > 0 && (double)(r->val_bytes + (int64_t)n) <= f * (double)r->bytes_seen) {
        r->val_bytes += (int64_t)n;
        return true;
    }
    return false;
}

/* Finds the end of the document starting at off in a text file: the start
 * of the next separator line (or the end). *next is where the following
 * document starts. */
static size_t doc_end(const char *p, size_t size, size_t off, const char *sep,
                      size_t *next)
{
    if (!sep) {
        *next = size;
        return size;
    }
    size_t sl = strlen(sep);
    size_t i = off;
    while (i < size) {
        const char *nl = memchr(p + i, '\n', size - i);
        size_t le = nl ? (size_t)(nl - p) : size;
        size_t ll = le - i;
        if (ll > 0 && p[le - 1] == '\r') ll--;
        if (ll == sl && !memcmp(p + i, sep, sl)) {
            *next = nl ? le + 1 : size;
            return i;
        }
        i = nl ? le + 1 : size;
    }
    *next = size;
    return size;
}

/* Appends units for up to max_bytes of input. Returns KILN_OK; *more is
 * false at the end of the input. */
static kiln_status gather(kiln_ctx *ctx, reader *r, unit **units, size_t *n_units,
                          size_t *cap, size_t max_bytes, size_t max_units, bool *more)
{
    size_t bytes = 0;
    *n_units = 0;
    while (r->fi < r->files->n && bytes < max_bytes && *n_units + 64 < max_units) {
        cfile *f = &r->files->v[r->fi];
        if (!f->mapped) {
            kiln_status s = file_map_open(ctx, f->path, &f->map);
            if (s) return s;
            f->mapped = true;
            r->off = 0;
            r->line = 0;
        }
        const char *p = (const char *)f->map.data;
        size_t size = f->map.size;
        if (r->off >= size) {
            r->fi++;
            continue;
        }
        if (*n_units + 1024 > *cap) {
            size_t nc = *cap ? 2 * *cap : 4096;
            unit *nu = realloc(*units, nc * sizeof *nu);
            if (!nu) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            *units = nu;
            *cap = nc;
        }
        if (f->jsonl) {
            const char *nl = memchr(p + r->off, '\n', size - r->off);
            size_t le = nl ? (size_t)(nl - p) : size;
            r->line++;
            size_t start = r->off;
            r->off = nl ? le + 1 : size;
            if (is_blank(p + start, le - start)) continue;
            (*units)[(*n_units)++] = (unit){.p = p + start, .n = le - start, .file = r->fi,
                                            .line = r->line, .jsonl = true, .first = true,
                                            .val = decide_val(r, le - start)};
            bytes += le - start;
            continue;
        }
        size_t next;
        size_t end = doc_end(p, size, r->off, r->o->doc_separator, &next);
        size_t start = r->off;
        r->off = next;
        if (end == start) continue;
        bool val = decide_val(r, end - start);
        bool first = true;
        while (start < end) {
            size_t cut = end;
            if (end - start > SEG_BYTES) {
                cut = start + kiln_tokenizer_split_point(r->tok, p + start, end - start,
                                                         SEG_BYTES);
            }
            if (*n_units + 1 > *cap) {
                size_t nc = 2 * *cap;
                unit *nu = realloc(*units, nc * sizeof *nu);
                if (!nu) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
                *units = nu;
                *cap = nc;
            }
            (*units)[(*n_units)++] = (unit){.p = p + start, .n = cut - start, .file = r->fi,
                                            .first = first, .val = val};
            first = false;
            bytes += cut - start;
            start = cut;
        }
    }
    *more = r->fi < r->files->n;
    return KILN_OK;
}

kiln_status kiln_tokenize_corpus(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                 const kiln_tokenize_opts *o, kiln_tokenize_stats *stats)
{
    kiln_tokenize_stats st = {0};
    double t0 = kiln_time_now();
    if (!o->out_dir || !*o->out_dir)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_tokenize_opts.out_dir: no output directory given");
    if (o->n_inputs <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_tokenize_opts.inputs: no input files given");
    if (!(o->val_fraction >= 0 && o->val_fraction < 1))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_tokenize_opts.val_fraction = %g must be in [0, 1)",
                         o->val_fraction);
    if (o->shard_tokens <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_tokenize_opts.shard_tokens = %lld must be positive",
                         (long long)o->shard_tokens);
    const char *fmt = o->format ? o->format : "auto";
    if (strcmp(fmt, "auto") && strcmp(fmt, "text") && strcmp(fmt, "jsonl"))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_tokenize_opts.format = '%s' must be auto, text or jsonl", fmt);
    kiln_tokenize_opts oo = *o;
    oo.format = fmt;
    if (!oo.field) oo.field = "text";
    int eot = kiln_tokenizer_eot(tok);
    int vocab = kiln_tokenizer_vocab_size(tok);
    if (eot < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "the tokenizer has no end-of-text token (such as "
                         "<|endoftext|>) to separate documents with");

    flist files = {0};
    kiln_status s = KILN_OK;
    collect_ud cu = {&files, &oo};
    for (int i = 0; i < o->n_inputs && !s; i++)
        s = file_walk(ctx, o->inputs[i], "kiln_tokenize_opts.inputs", collect_one, &cu);
    if (!s && files.n == 0)
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_tokenize_opts.inputs: no text files found in the inputs");
    int64_t total = 0;
    for (int i = 0; i < files.n; i++) total += files.v[i].size;
    if (!s) s = file_mkdirs(ctx, o->out_dir);

    int nt = o->threads > 0 ? o->threads : omp_get_num_procs();
    if (nt < 1) nt = 1;
    kiln_ctx **tctx = calloc((size_t)nt, sizeof *tctx);
    kiln_encoder **tenc = calloc((size_t)nt, sizeof *tenc);
    if ((!tctx || !tenc) && !s) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    for (int i = 0; i < nt && !s; i++)
        if (!(tctx[i] = kiln_ctx_new())) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        else s = kiln_encoder_new(ctx, tok, &tenc[i]);
    json_object_seed(0); /* before threads use jansson */

    splitw tr = {.prefix = "train"}, va = {.prefix = "val"};
    reader r = {.files = &files, .o = &oo, .tok = tok};
    unit *units = NULL;
    result *res = NULL;
    size_t cap = 0, n_units = 0, res_cap = 0;
    size_t max_bytes = (size_t)nt * 4 * SEG_BYTES, max_units = 1u << 16;
    bool more = true, bad = false;
    int32_t eot_id = eot;
    double last_report = 0;
    int64_t bytes_done = 0;
    int unmapped_upto = 0;
    while (!s && more) {
        s = gather(ctx, &r, &units, &n_units, &cap, max_bytes, max_units, &more);
        if (s) break;
        if (n_units > res_cap) {
            result *nr = realloc(res, n_units * sizeof *nr);
            if (!nr) { s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory"); break; }
            res = nr;
            res_cap = n_units;
        }
        if (n_units) memset(res, 0, n_units * sizeof *res);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (size_t i = 0; i < n_units; i++) {
            kiln_ctx *c = tctx[omp_get_thread_num()];
            kiln_encoder *en = tenc[omp_get_thread_num()];
            const unit *u = &units[i];
            result *q = &res[i];
            const char *text = u->p;
            size_t len = u->n;
            char *owned = NULL;
            if (u->jsonl) {
                if (kiln_jsonl_get_string(c, u->p, u->n, oo.field, &owned, &len)) {
                    q->err = strdup(kiln_errmsg(c));
                    continue;
                }
                text = owned;
            }
            if (kiln_encoder_encode(c, en, text, len, &q->ids, &q->n))
                q->err = strdup(kiln_errmsg(c));
            free(owned);
        }
        for (size_t i = 0; i < n_units; i++) {
            const unit *u = &units[i];
            result *q = &res[i];
            bytes_done += (int64_t)u->n + (u->jsonl ? 1 : 0);
            if (q->err) {
                kiln_log(ctx, KILN_LOG_ERROR, "%s:%lld: %s", files.v[u->file].path,
                         (long long)u->line, q->err);
                st.bad_lines++;
                bad = true;
                continue;
            }
            if (s) continue;
            splitw *sw = u->val ? &va : &tr;
            if (u->first && (q->n > 0 || !u->jsonl)) {
                st.docs++;
                s = split_append(ctx, sw, &oo, vocab, &eot_id, 1);
            }
            if (!s) s = split_append(ctx, sw, &oo, vocab, q->ids, q->n);
        }
        for (size_t i = 0; i < n_units; i++) {
            free(res[i].ids);
            free(res[i].err);
        }
        /* files fully consumed can be unmapped */
        for (; unmapped_upto < r.fi; unmapped_upto++)
            if (files.v[unmapped_upto].mapped) {
                file_map_close(&files.v[unmapped_upto].map);
                files.v[unmapped_upto].mapped = false;
            }
        double now = kiln_time_now();
        if (o->progress && (now - last_report > 0.5 || !more)) {
            last_report = now;
            kiln_tokenize_progress pr = {.bytes_done = more ? bytes_done : total,
                                         .bytes_total = total,
                                         .tokens = tr.tokens + va.tokens,
                                         .docs = st.docs,
                                         .seconds = now - t0};
            o->progress(o->progress_ud, &pr);
        }
    }
    if (!s && bad && !o->skip_bad)
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "%lld malformed JSONL line%s (each reported above); fix them or "
                      "set kiln_tokenize_opts.skip_bad to leave them out",
                      (long long)st.bad_lines, st.bad_lines == 1 ? "" : "s");
    if (!s && tr.w) {
        kiln_shard_writer *w = tr.w;
        tr.w = NULL;
        s = kiln_shard_writer_close(ctx, w);
    }
    if (!s && va.w) {
        kiln_shard_writer *w = va.w;
        va.w = NULL;
        s = kiln_shard_writer_close(ctx, w);
    }
    if (!s && tr.tokens == 0)
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "no training tokens: the inputs hold no documents%s",
                      o->val_fraction > 0 ? " outside the validation split" : "");
    if (!s) {
        char *tj = file_join(o->out_dir, "tokenizer.json");
        s = tj ? kiln_tokenizer_save(ctx, tok, tj) : kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        free(tj);
    }
    if (!s) {
        json_t *tf = json_array(), *vf = json_array();
        for (int i = 0; i < tr.n_names; i++) json_array_append_new(tf, json_string(tr.names[i]));
        for (int i = 0; i < va.n_names; i++) json_array_append_new(vf, json_string(va.names[i]));
        json_t *meta = json_pack("{s:s, s:i, s:i, s:i, s:s, s:o, s:o, s:I, s:I}", "format",
                                 "kiln-tokens", "version", 1, "vocab_size", vocab, "eot", eot,
                                 "tokenizer", o->tokenizer_spec ? o->tokenizer_spec : "",
                                 "train_files", tf, "val_files", vf, "train_tokens",
                                 (json_int_t)tr.tokens, "val_tokens", (json_int_t)va.tokens);
        char *mp = file_join(o->out_dir, "meta.json");
        if (!meta || !mp) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        else s = js_save_file(ctx, mp, meta);
        json_decref(meta);
        free(mp);
    }
    st.files = files.n;
    st.bytes = total;
    st.train_tokens = tr.tokens;
    st.val_tokens = va.tokens;
    st.train_files = tr.n_names;
    st.val_files = va.n_names;
    st.seconds = kiln_time_now() - t0;
    if (o->val_fraction > 0 && va.tokens == 0 && !s)
        kiln_log(ctx, KILN_LOG_WARN,
                 "tokenize: no document went to validation (%lld documents); use "
                 "more files or kiln_tokenize_opts.doc_separator to cut them into documents",
                 (long long)st.docs);
    split_cleanup(&tr, o->out_dir, s != KILN_OK);
    split_cleanup(&va, o->out_dir, s != KILN_OK);
    for (int i = 0; i < files.n; i++) {
        if (files.v[i].mapped) file_map_close(&files.v[i].map);
        free(files.v[i].path);
    }
    free(files.v);
    free(units);
    free(res);
    if (tctx)
        for (int i = 0; i < nt; i++) kiln_ctx_free(tctx[i]);
    if (tenc)
        for (int i = 0; i < nt; i++) kiln_encoder_free(tenc[i]);
    free(tctx);
    free(tenc);
    if (stats) *stats = st;
    return s;
}
