/*
 * loader.c — data directories (meta.json + token shards) and the window
 * loader the trainer draws batches from.
 *
 * A split (train or val) is the concatenation of its shards, read as one
 * token stream. It is cut into windows of T+1 tokens with stride T, so the
 * target of the last position of window w is the first input of window
 * w+1. Windows are visited through a global position that runs across
 * epochs; with shuffle, epoch e uses a Fisher-Yates permutation drawn from
 * an rng seeded by (seed, e), so the order depends on nothing else (not
 * the world size, not where a run was resumed).
 */
#include "base/base.h"

#include <stdlib.h>
#include <string.h>

typedef struct split_files {
    int n;
    kiln_shard **shards;
    size_t *start; /* (n+1) prefix sums of token counts */
} split_files;

struct kiln_data {
    char *dir;
    char *tokenizer;
    int vocab_size;
    int eot;
    split_files split[2];
};

static void split_free(split_files *sf)
{
    for (int i = 0; i < sf->n; i++) kiln_shard_close(sf->shards[i]);
    free(sf->shards);
    free(sf->start);
    memset(sf, 0, sizeof *sf);
}

void kiln_data_close(kiln_data *d)
{
    if (!d) return;
    split_free(&d->split[0]);
    split_free(&d->split[1]);
    free(d->dir);
    free(d->tokenizer);
    free(d);
}

static kiln_status open_split(kiln_ctx *ctx, kiln_data *d, json_t *meta,
                              const char *meta_path, const char *key,
                              split_files *sf)
{
    json_t *arr = json_object_get(meta, key);
    if (!arr) return KILN_OK;
    if (!json_is_array(arr))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: field \"%s\" must be an array of file names",
                         meta_path, key);
    size_t n = json_array_size(arr);
    sf->shards = kiln_calloc(ctx, n + 1, sizeof *sf->shards);
    sf->start = kiln_calloc(ctx, n + 1, sizeof *sf->start);
    if (!sf->shards || !sf->start) return KILN_ERR_NOMEM;
    for (size_t i = 0; i < n; i++) {
        const char *name = json_string_value(json_array_get(arr, i));
        if (!name || !*name || strstr(name, ".."))
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: entry %zu of \"%s\" must be a file name "
                             "inside the data directory",
                             meta_path, i, key);
        char *path = file_join(d->dir, name);
        if (!path) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        kiln_status s = kiln_shard_open(ctx, path, &sf->shards[i]);
        if (s) {
            free(path);
            return s;
        }
        sf->n = (int)i + 1;
        int sv = kiln_shard_vocab_size(sf->shards[i]);
        if (sv != d->vocab_size) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "token shard '%s' has vocab_size %d but %s says %d; "
                          "re-create the data directory with kiln tokenize",
                          path, sv, meta_path, d->vocab_size);
            free(path);
            return s;
        }
        free(path);
        sf->start[i + 1] = sf->start[i] + kiln_shard_count(sf->shards[i]);
    }
    return KILN_OK;
}

kiln_status kiln_data_open(kiln_ctx *ctx, const char *dir, kiln_data **out)
{
    *out = NULL;
    if (!file_is_dir(dir))
        return kiln_fail(ctx, KILN_ERR_IO,
                         "data directory '%s' does not exist; create it with "
                         "kiln_tokenize_corpus (kiln tokenize), "
                         "kiln_tokenize_opts.out_dir = %s",
                         dir, dir);
    kiln_data *d = kiln_calloc(ctx, 1, sizeof *d);
    if (!d) return KILN_ERR_NOMEM;
    d->dir = strdup(dir);
    char *meta_path = file_join(dir, "meta.json");
    json_t *meta = NULL;
    kiln_status s = KILN_OK;
    if (!d->dir || !meta_path) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto done;
    }
    if (!file_exists(meta_path)) {
        s = kiln_fail(ctx, KILN_ERR_IO,
                      "'%s' is missing: '%s' is not a kiln data directory "
                      "(create one with kiln tokenize)",
                      meta_path, dir);
        goto done;
    }
    if ((s = js_load_file(ctx, meta_path, &meta))) goto done;
    const char *fmt = NULL, *tok = "bytes";
    int64_t vocab = 0, eot = -1, version = 0;
    if ((s = js_get_str(ctx, meta, "format", meta_path, true, &fmt))) goto done;
    if (strcmp(fmt, "kiln-tokens") != 0) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "%s: \"format\" is \"%s\", expected \"kiln-tokens\"",
                      meta_path, fmt);
        goto done;
    }
    if ((s = js_get_int(ctx, meta, "version", meta_path, true, &version)))
        goto done;
    if (version != 1) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "%s: version %lld is not supported (this kiln reads 1)",
                      meta_path, (long long)version);
        goto done;
    }
    if ((s = js_get_int(ctx, meta, "vocab_size", meta_path, true, &vocab)) ||
        (s = js_get_int(ctx, meta, "eot", meta_path, false, &eot)) ||
        (s = js_get_str(ctx, meta, "tokenizer", meta_path, false, &tok)))
        goto done;
    if (vocab <= 0 || vocab > (1 << 30) || eot >= vocab) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "%s: vocab_size %lld / eot %lld are out of range",
                      meta_path, (long long)vocab, (long long)eot);
        goto done;
    }
    d->vocab_size = (int)vocab;
    d->eot = (int)eot;
    d->tokenizer = strdup(tok);
    if ((s = open_split(ctx, d, meta, meta_path, "train_files", &d->split[0])) ||
        (s = open_split(ctx, d, meta, meta_path, "val_files", &d->split[1])))
        goto done;
    /* the recorded counts (optional) must match the shards' headers */
    for (int k = 0; k < 2; k++) {
        const char *key = k ? "val_tokens" : "train_tokens";
        int64_t want = -1;
        if ((s = js_get_int(ctx, meta, key, meta_path, false, &want))) goto done;
        size_t have = kiln_data_tokens(d, k ? KILN_SPLIT_VAL : KILN_SPLIT_TRAIN);
        if (want != -1 && (want < 0 || (uint64_t)want != (uint64_t)have)) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: \"%s\" is %lld but its shards hold %zu tokens; "
                          "the data directory is damaged or was edited, "
                          "re-create it with kiln tokenize",
                          meta_path, key, (long long)want, have);
            goto done;
        }
    }
    if (d->split[0].n == 0 && d->split[1].n == 0)
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "%s lists no train_files and no val_files", meta_path);
done:
    json_decref(meta);
    free(meta_path);
    if (s) {
        kiln_data_close(d);
        return s;
    }
    *out = d;
    return KILN_OK;
}

int kiln_data_vocab_size(const kiln_data *d) { return d->vocab_size; }
int kiln_data_eot(const kiln_data *d) { return d->eot; }
const char *kiln_data_tokenizer(const kiln_data *d) { return d->tokenizer; }
const char *kiln_data_dir(const kiln_data *d) { return d->dir; }

size_t kiln_data_tokens(const kiln_data *d, kiln_split split)
{
    const split_files *sf = &d->split[split == KILN_SPLIT_VAL];
    return sf->n ? sf->start[sf->n] : 0;
}

/* ---- loader --------------------------------------------------------- */

struct kiln_loader {
    const split_files *sf;
    int T;
    bool shuffle;
    uint64_t seed;
    int64_t nwin;
    int64_t perm_epoch; /* epoch whose permutation is in perm; -1 none */
    int64_t *perm;      /* (nwin) */
    int last_shard;     /* lookup hint */
};

kiln_status kiln_loader_new(kiln_ctx *ctx, const kiln_data *d,
                            kiln_split split, int T, bool shuffle,
                            uint64_t seed, kiln_loader **out)
{
    *out = NULL;
    const split_files *sf = &d->split[split == KILN_SPLIT_VAL];
    const char *name = split == KILN_SPLIT_VAL ? "validation" : "training";
    if (T <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "sequence length must be positive (got %d)", T);
    size_t ntok = sf->n ? sf->start[sf->n] : 0;
    if (ntok < (size_t)T + 1)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "the %s split of '%s' has %zu tokens, fewer than one "
                         "window of T = %d + 1 tokens; use a smaller T or more "
                         "data",
                         name, d->dir, ntok, T);
    kiln_loader *l = kiln_calloc(ctx, 1, sizeof *l);
    if (!l) return KILN_ERR_NOMEM;
    l->sf = sf;
    l->T = T;
    l->shuffle = shuffle;
    l->seed = seed;
    l->nwin = (int64_t)((ntok - 1) / (size_t)T);
    l->perm_epoch = -1;
    if (shuffle) {
        l->perm = kiln_malloc(ctx, (size_t)l->nwin * sizeof *l->perm);
        if (!l->perm) {
            free(l);
            return KILN_ERR_NOMEM;
        }
    }
    *out = l;
    return KILN_OK;
}

void kiln_loader_free(kiln_loader *l)
{
    if (!l) return;
    free(l->perm);
    free(l);
}

int64_t kiln_loader_num_windows(const kiln_loader *l) { return l->nwin; }

int64_t kiln_loader_window_at(kiln_loader *l, int64_t pos)
{
    KILN_ASSERT(pos >= 0);
    int64_t epoch = pos / l->nwin, idx = pos % l->nwin;
    if (!l->shuffle) return idx;
    if (epoch != l->perm_epoch) {
        kiln_rng r;
        /* A distinct stream per epoch, from the seed alone. */
        kiln_rng_seed(&r, l->seed ^ (0x9E3779B97F4A7C15ULL * (uint64_t)(epoch + 1)));
        for (int64_t i = 0; i < l->nwin; i++) l->perm[i] = i;
        for (int64_t i = l->nwin - 1; i > 0; i--) {
            int64_t j = (int64_t)kiln_rng_below(&r, (uint64_t)i + 1);
            int64_t t = l->perm[i];
            l->perm[i] = l->perm[j];
            l->perm[j] = t;
        }
        l->perm_epoch = epoch;
    }
    return l->perm[idx];
}

/* Copies n tokens of the split's stream starting at token `at`. */
static void stream_read(kiln_loader *l, size_t at, size_t n, int32_t *out)
{
    const split_files *sf = l->sf;
    int i = l->last_shard;
    if (i >= sf->n || at < sf->start[i] || at >= sf->start[i + 1]) {
        int lo = 0, hi = sf->n - 1; /* last shard with start <= at */
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (sf->start[mid] <= at) lo = mid;
            else hi = mid - 1;
        }
        i = lo;
    }
    while (n > 0) {
        size_t off = at - sf->start[i];
        size_t avail = sf->start[i + 1] - at;
        size_t k = n < avail ? n : avail;
        if (k > 0) kiln_shard_read(sf->shards[i], off, k, out);
        out += k;
        at += k;
        n -= k;
        if (n > 0) i++;
    }
    l->last_shard = i;
}

void kiln_loader_get(kiln_loader *l, int64_t pos, int32_t *inputs,
                     int32_t *targets)
{
    int64_t w = kiln_loader_window_at(l, pos);
    int T = l->T;
    stream_read(l, (size_t)w * (size_t)T, (size_t)T, inputs);
    memmove(targets, inputs + 1, (size_t)(T - 1) * sizeof *targets);
    stream_read(l, (size_t)w * (size_t)T + (size_t)T, 1, targets + T - 1);
}

void kiln_data_read(const kiln_data *d, kiln_split split, size_t start,
                    size_t n, int32_t *out)
{
    kiln_loader l = {.sf = &d->split[split == KILN_SPLIT_VAL]};
    KILN_ASSERT(start + n <= kiln_data_tokens(d, split));
    stream_read(&l, start, n, out);
}
