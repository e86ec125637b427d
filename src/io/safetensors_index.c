/*
 * safetensors_index.c — a model's weights as one safetensors file or as
 * HF's shards: model.safetensors.index.json maps each tensor name to the
 * shard file holding it ({"metadata": {...}, "weight_map": {name: file}}).
 * Every shard is mapped and validated by st_open; the set then answers
 * look-ups by name across all files (st_set_find). See safetensors.h.
 */
#include "io/safetensors.h"

#include <stdlib.h>
#include <string.h>

#define ST_INDEX "model.safetensors.index.json"
#define ST_SINGLE "model.safetensors"

void st_set_close(st_set *s)
{
    if (!s) return;
    for (int i = 0; i < s->n_files; i++) {
        st_close(&s->files[i]);
        free(s->paths[i]);
    }
    free(s->files);
    free(s->paths);
    free(s->refs);
    memset(s, 0, sizeof *s);
}

static int ref_cmp(const void *a, const void *b)
{
    return strcmp(((const st_ref *)a)->name, ((const st_ref *)b)->name);
}

const st_tensor *st_set_find(const st_set *s, const char *name, int *file)
{
    st_ref key = {.name = name};
    const st_ref *r = s->n_refs ? bsearch(&key, s->refs, (size_t)s->n_refs, sizeof key, ref_cmp)
                                : NULL;
    if (!r) return NULL;
    if (file) *file = r->file;
    return r->t;
}

/* Opens path as file i of s (paths[i] takes ownership of path). */
static kiln_status add_file(kiln_ctx *ctx, st_set *s, char *path)
{
    int i = s->n_files;
    st_file *nf = realloc(s->files, (size_t)(i + 1) * sizeof *nf);
    if (nf) s->files = nf;
    char **np = nf ? realloc(s->paths, (size_t)(i + 1) * sizeof *np) : NULL;
    if (np) s->paths = np;
    if (!nf || !np) {
        free(path);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    kiln_status st = st_open(ctx, path, &s->files[i]);
    if (st) {
        free(path);
        return st;
    }
    s->paths[i] = path;
    s->n_files++;
    return KILN_OK;
}

/* Every tensor of every file into refs, sorted; a name in two files is
 * an error naming both. */
static kiln_status build_refs(kiln_ctx *ctx, st_set *s)
{
    size_t n = 0;
    for (int i = 0; i < s->n_files; i++) n += (size_t)s->files[i].n_tensors;
    s->refs = malloc((n ? n : 1) * sizeof *s->refs);
    if (!s->refs) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    for (int i = 0; i < s->n_files; i++)
        for (int k = 0; k < s->files[i].n_tensors; k++)
            s->refs[s->n_refs++] = (st_ref){s->files[i].tensors[k].name, i,
                                            &s->files[i].tensors[k]};
    qsort(s->refs, n, sizeof *s->refs, ref_cmp);
    for (size_t k = 1; k < n; k++)
        if (!strcmp(s->refs[k].name, s->refs[k - 1].name))
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "tensor \"%s\" is stored twice: in %s and in %s (a sharded "
                             "checkpoint holds each tensor once)",
                             s->refs[k].name, s->paths[s->refs[k - 1].file],
                             s->paths[s->refs[k].file]);
    return KILN_OK;
}

/* A shard name from the index: a plain file name, never a path out of
 * the model directory. */
static bool shard_name_ok(const char *f)
{
    return *f && !strchr(f, '/') && strcmp(f, ".") && strcmp(f, "..");
}

static kiln_status open_index(kiln_ctx *ctx, const char *dir, const char *ipath, st_set *s)
{
    json_t *o;
    kiln_status st = js_load_file(ctx, ipath, &o);
    if (st) return st;
    json_t *wm = json_is_object(o) ? json_object_get(o, "weight_map") : NULL;
    if (!json_is_object(wm) || !json_object_size(wm)) {
        json_decref(o);
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: needs \"weight_map\": a non-empty object {tensor name: shard "
                         "file}", ipath);
    }
    const char *key;
    json_t *v;
    /* the shards, each once, in the order the map first names them */
    json_object_foreach(wm, key, v)
    {
        const char *fn = json_is_string(v) ? json_string_value(v) : NULL;
        if (!fn || !shard_name_ok(fn)) {
            st = kiln_fail(ctx, KILN_ERR_FORMAT,
                           "%s: \"weight_map\".\"%s\" must be the file name of a shard in "
                           "the model directory (a string without '/')", ipath, key);
            break;
        }
        bool seen = false;
        for (int i = 0; i < s->n_files && !seen; i++)
            seen = !strcmp(strrchr(s->paths[i], '/') + 1, fn);
        if (seen) continue;
        char *p = file_join(dir, fn);
        if (!p) {
            st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            break;
        }
        if (!file_exists(p)) {
            st = kiln_fail(ctx, KILN_ERR_FORMAT,
                           "%s: shard \"%s\" (holding tensor \"%s\") is missing: expected "
                           "%s", ipath, fn, key, p);
            free(p);
            break;
        }
        if ((st = add_file(ctx, s, p))) break;
    }
    if (!st) st = build_refs(ctx, s);
    /* every mapped tensor is where the map says */
    if (!st)
        json_object_foreach(wm, key, v)
        {
            int fi = -1;
            const char *fn = json_string_value(v);
            if (!st_set_find(s, key, &fi)) {
                st = kiln_fail(ctx, KILN_ERR_FORMAT,
                               "%s: tensor \"%s\" is mapped to shard \"%s\", which has no "
                               "such tensor", ipath, key, fn);
                break;
            }
            if (strcmp(strrchr(s->paths[fi], '/') + 1, fn)) {
                st = kiln_fail(ctx, KILN_ERR_FORMAT,
                               "%s: tensor \"%s\" is mapped to shard \"%s\" but is stored in "
                               "%s", ipath, key, fn, s->paths[fi]);
                break;
            }
        }
    json_decref(o);
    return st;
}

kiln_status st_set_open_dir(kiln_ctx *ctx, const char *dir, st_set *out)
{
    memset(out, 0, sizeof *out);
    char *ipath = file_join(dir, ST_INDEX), *spath = file_join(dir, ST_SINGLE);
    kiln_status st = KILN_OK;
    if (!ipath || !spath) {
        st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    } else if (file_exists(ipath)) {
        st = open_index(ctx, dir, ipath, out);
    } else if (file_exists(spath)) {
        st = add_file(ctx, out, spath);
        spath = NULL;
        if (!st) st = build_refs(ctx, out);
    } else {
        st = kiln_fail(ctx, KILN_ERR_IO,
                       "%s: no weights: neither %s nor %s (sharded) exists", dir, ST_SINGLE,
                       ST_INDEX);
    }
    if (st) st_set_close(out);
    free(ipath);
    free(spath);
    return st;
}
