/*
 * ckpt.c — checkpoint directories of a training run.
 *
 *   RUN/step_00000100/   config.json, model.safetensors (kiln_model_save),
 *                        optimizer.safetensors, trainer_state.json,
 *                        tokenizer.json (copied from the data directory),
 *                        tokenizer_config.json (when one sits beside it),
 *                        adapter_config.json, adapter_model.safetensors (a
 *                        LoRA run: the checkpoint is a PEFT adapter directory
 *                        too, kiln_lora_save),
 *                        checksums.json (size + CRC-32C of every other file)
 *   RUN/latest           the name of the newest complete checkpoint
 *
 * A checkpoint is assembled in RUN/.step_00000100.tmp.<pid>, every file
 * fsynced, the directory fsynced, then renamed into place and RUN fsynced;
 * only then is RUN/latest replaced (atomically). A kill at any instant
 * leaves the previous checkpoint intact and `latest` pointing at a
 * complete one. Loading verifies checksums.json first and names the file
 * that does not match.
 */
#include "train/ckpt.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const ckpt_files[] = {
    "config.json", "model.safetensors", "optimizer.safetensors",
    "trainer_state.json", "tokenizer.json", "tokenizer_config.json", "adapter_config.json",
    "adapter_model.safetensors", "sparsity.json", NULL};

/* Removes a flat directory (files only, as checkpoints are). */
static void rm_flat_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char *p = file_join(dir, e->d_name);
            if (p) unlink(p);
            free(p);
        }
        closedir(d);
    }
    rmdir(dir);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Sorted names of RUN/step_* directories; *n set; caller frees each and
 * the array. */
static char **list_checkpoints(const char *run, int *n)
{
    *n = 0;
    DIR *d = opendir(run);
    if (!d) return NULL;
    int cap = 16;
    char **v = malloc((size_t)cap * sizeof *v);
    struct dirent *e;
    while (v && (e = readdir(d))) {
        if (strncmp(e->d_name, "step_", 5) != 0) continue;
        char *p = file_join(run, e->d_name);
        bool dir = p && file_is_dir(p);
        free(p);
        if (!dir) continue;
        if (*n == cap) {
            char **nv = realloc(v, (size_t)(cap *= 2) * sizeof *v);
            if (!nv) break;
            v = nv;
        }
        v[(*n)++] = strdup(e->d_name);
    }
    closedir(d);
    if (v) qsort(v, (size_t)*n, sizeof *v, cmp_str);
    return v;
}

static void free_list(char **v, int n)
{
    for (int i = 0; i < n; i++) free(v[i]);
    free(v);
}

static kiln_status copy_file(kiln_ctx *ctx, const char *from, const char *to)
{
    char *buf;
    size_t len;
    kiln_status s = file_read_all(ctx, from, &buf, &len);
    if (s) return s;
    s = file_write_atomic(ctx, to, buf, len);
    free(buf);
    return s;
}

static kiln_status file_crc(kiln_ctx *ctx, const char *path, uint32_t *crc,
                            size_t *size)
{
    file_map m;
    kiln_status s = file_map_open(ctx, path, &m);
    if (s) return s;
    *crc = crc32c(0, m.data, m.size);
    *size = m.size;
    file_map_close(&m);
    return KILN_OK;
}

kiln_status ckpt_save(kiln_ctx *ctx, const ckpt_save_args *a, char *out_dir,
                      size_t cap)
{
    char name[64], tmpname[128];
    snprintf(name, sizeof name, "step_%08lld", (long long)a->step);
    snprintf(tmpname, sizeof tmpname, ".%s.tmp.%ld", name, (long)getpid());
    char *tmp = file_join(a->run_dir, tmpname);
    char *final = file_join(a->run_dir, name);
    json_t *sums = json_object(), *files = json_object();
    kiln_status s = KILN_OK;
    if (!tmp || !final || !sums || !files) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto done;
    }
    /* leftovers of saves that were killed */
    DIR *d = opendir(a->run_dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)))
            if (!strncmp(e->d_name, ".step_", 6) && strstr(e->d_name, ".tmp.")) {
                char *p = file_join(a->run_dir, e->d_name);
                if (p) rm_flat_dir(p);
                free(p);
            }
        closedir(d);
    }
    if ((s = file_mkdirs(ctx, tmp))) goto done;
    if ((s = kiln_model_save(ctx, a->model, tmp))) goto done;
    if (kiln_model_config(a->model)->lora_rank > 0 &&
        (s = kiln_lora_save(ctx, a->model, tmp, a->base_model)))
        goto done;
    char *p = file_join(tmp, "optimizer.safetensors");
    s = kiln_adamw_save(ctx, a->opt, p);
    free(p);
    if (s) goto done;
    p = file_join(tmp, "trainer_state.json");
    s = js_save_file(ctx, p, a->state);
    free(p);
    if (s) goto done;
    if (a->tokenizer_json && file_exists(a->tokenizer_json)) {
        p = file_join(tmp, "tokenizer.json");
        s = copy_file(ctx, a->tokenizer_json, p);
        free(p);
        if (s) goto done;
        /* its tokenizer_config.json (the chat template) goes along */
        char *dir = strdup(a->tokenizer_json);
        char *sl = dir ? strrchr(dir, '/') : NULL;
        if (sl) *sl = 0;
        char *cfg = dir ? file_join(sl ? dir : ".", "tokenizer_config.json") : NULL;
        if (cfg && file_exists(cfg)) {
            p = file_join(tmp, "tokenizer_config.json");
            s = copy_file(ctx, cfg, p);
            free(p);
        }
        free(cfg);
        free(dir);
        if (s) goto done;
    }
    if (a->sparsity_json) {
        p = file_join(tmp, "sparsity.json");
        s = p ? copy_file(ctx, a->sparsity_json, p) : kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        free(p);
        if (s) goto done;
    }
    for (int i = 0; ckpt_files[i]; i++) {
        p = file_join(tmp, ckpt_files[i]);
        if (!file_exists(p)) {
            free(p);
            continue;
        }
        uint32_t crc;
        size_t size;
        s = file_crc(ctx, p, &crc, &size);
        free(p);
        if (s) goto done;
        char hex[16];
        snprintf(hex, sizeof hex, "%08x", crc);
        json_object_set_new(files, ckpt_files[i],
                            json_pack("{s:I,s:s}", "size", (json_int_t)size,
                                      "crc32c", hex));
    }
    json_object_set_new(sums, "format", json_string("kiln-checksums"));
    json_object_set_new(sums, "algorithm", json_string("crc32c"));
    json_object_set(sums, "files", files);
    p = file_join(tmp, "checksums.json");
    s = js_save_file(ctx, p, sums);
    free(p);
    if (s) goto done;
    if ((s = file_fsync_dir(ctx, tmp))) goto done;
    if (file_exists(final)) rm_flat_dir(final); /* re-save of the same step */
    if (rename(tmp, final) != 0) {
        s = kiln_fail(ctx, KILN_ERR_IO, "cannot rename '%s' to '%s': %s", tmp,
                      final, strerror(errno));
        goto done;
    }
    if ((s = file_fsync_dir(ctx, a->run_dir))) goto done;
    p = file_join(a->run_dir, "latest");
    char line[80];
    int len = snprintf(line, sizeof line, "%s\n", name);
    s = file_write_atomic(ctx, p, line, (size_t)len);
    free(p);
    if (s) goto done;
    snprintf(out_dir, cap, "%s", final);
    if (a->keep_last > 0) {
        int n;
        char **v = list_checkpoints(a->run_dir, &n);
        for (int i = 0; v && i < n - a->keep_last; i++) {
            if (!strcmp(v[i], name)) continue;
            p = file_join(a->run_dir, v[i]);
            if (p) rm_flat_dir(p);
            free(p);
        }
        free_list(v, n);
    }
done:
    if (s && tmp) rm_flat_dir(tmp);
    json_decref(sums);
    json_decref(files);
    free(tmp);
    free(final);
    return s;
}

/* Appends " (earlier checkpoints in RUN: a, b; resume from one with
 * --resume RUN/a)" to the error when the run directory has others. */
static kiln_status fail_with_alternatives(kiln_ctx *ctx, kiln_status st,
                                          const char *dir, const char *msg)
{
    char *cp = strdup(dir);
    char run[1024] = "", self[256] = "";
    if (cp) {
        char *slash = strrchr(cp, '/');
        while (slash && slash[1] == 0 && slash > cp) { /* trailing '/' */
            *slash = 0;
            slash = strrchr(cp, '/');
        }
        snprintf(self, sizeof self, "%s", slash ? slash + 1 : cp);
        if (slash) {
            *slash = 0;
            snprintf(run, sizeof run, "%s", *cp ? cp : "/");
        } else {
            snprintf(run, sizeof run, ".");
        }
    }
    free(cp);
    int n = 0;
    char **v = list_checkpoints(run, &n);
    char alt[1024] = "";
    size_t used = 0;
    const char *pick = NULL;
    for (int i = n - 1; v && i >= 0 && used < 900; i--) {
        if (!strcmp(v[i], self)) continue;
        used += (size_t)snprintf(alt + used, sizeof alt - used, "%s%s",
                                 used ? ", " : "", v[i]);
        if (!pick) pick = v[i];
    }
    if (pick)
        kiln_fail(ctx, st, "%s; other checkpoints of this run: %s (resume "
                  "from one: kiln_train_opts.resume = %s/%s)",
                  msg, alt, run, pick);
    else
        kiln_fail(ctx, st, "%s", msg);
    free_list(v, n);
    return st;
}

kiln_status kiln_checkpoint_verify(kiln_ctx *ctx, const char *dir)
{
    char *sp = file_join(dir, "checksums.json");
    if (!sp) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!file_exists(sp)) {
        free(sp);
        return KILN_OK;
    }
    json_t *j = NULL;
    char msg[1536];
    kiln_status s = js_load_file(ctx, sp, &j);
    if (s) {
        snprintf(msg, sizeof msg, "checkpoint '%s' is damaged: %s", dir,
                 kiln_errmsg(ctx));
        free(sp);
        return fail_with_alternatives(ctx, KILN_ERR_CHECKSUM, dir, msg);
    }
    json_t *files = json_object_get(j, "files");
    const char *key;
    json_t *val;
    if (!json_is_object(files)) {
        snprintf(msg, sizeof msg, "'%s' has no \"files\" object", sp);
        s = KILN_ERR_CHECKSUM;
    } else {
        json_object_foreach(files, key, val)
        {
            char *p = file_join(dir, key);
            const char *want = json_string_value(json_object_get(val, "crc32c"));
            json_int_t wsize = json_integer_value(json_object_get(val, "size"));
            uint32_t crc = 0;
            size_t size = 0;
            if (strchr(key, '/') || !want) {
                snprintf(msg, sizeof msg, "'%s': bad entry \"%s\"", sp, key);
                s = KILN_ERR_CHECKSUM;
            } else if (!file_exists(p)) {
                snprintf(msg, sizeof msg, "checkpoint file '%s' is missing", p);
                s = KILN_ERR_CHECKSUM;
            } else if (file_crc(ctx, p, &crc, &size)) {
                snprintf(msg, sizeof msg, "checkpoint file '%s': %s", p,
                         kiln_errmsg(ctx));
                s = KILN_ERR_IO;
            } else if ((json_int_t)size != wsize) {
                snprintf(msg, sizeof msg,
                         "checkpoint file '%s' is truncated or damaged: %zu "
                         "bytes, checksums.json says %lld",
                         p, size, (long long)wsize);
                s = KILN_ERR_CHECKSUM;
            } else {
                char hex[16];
                snprintf(hex, sizeof hex, "%08x", crc);
                if (strcmp(hex, want)) {
                    snprintf(msg, sizeof msg,
                             "checkpoint file '%s' is corrupted: CRC-32C %s, "
                             "checksums.json says %s",
                             p, hex, want);
                    s = KILN_ERR_CHECKSUM;
                }
            }
            free(p);
            if (s) break;
        }
    }
    json_decref(j);
    free(sp);
    if (s) return fail_with_alternatives(ctx, s, dir, msg);
    return KILN_OK;
}

kiln_status kiln_checkpoint_resolve(kiln_ctx *ctx, const char *path,
                                    char *out, size_t cap)
{
    if (!file_is_dir(path))
        return kiln_fail(ctx, KILN_ERR_IO,
                         "'%s' is not a directory (give a run directory or one "
                         "of its step_* checkpoints)",
                         path);
    char *st = file_join(path, "trainer_state.json");
    bool is_ckpt = st && file_exists(st);
    free(st);
    if (is_ckpt) {
        snprintf(out, cap, "%s", path);
        return KILN_OK;
    }
    char *lp = file_join(path, "latest");
    char *buf = NULL;
    kiln_status s = KILN_OK;
    if (!lp || !file_exists(lp)) {
        s = kiln_fail(ctx, KILN_ERR_IO,
                      "'%s' holds no checkpoint (no "
                      "trainer_state.json and no 'latest' file)",
                      path);
    } else if (!(s = file_read_all(ctx, lp, &buf, NULL))) {
        buf[strcspn(buf, "\r\n")] = 0;
        if (strncmp(buf, "step_", 5) || strchr(buf, '/')) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "'%s' does not name a checkpoint ('%s')", lp, buf);
        } else {
            char *c = file_join(path, buf);
            if (!c || !file_is_dir(c))
                s = kiln_fail(ctx, KILN_ERR_IO,
                              "'%s' names '%s', which does not exist", lp, buf);
            else
                snprintf(out, cap, "%s", c);
            free(c);
        }
    }
    free(buf);
    free(lp);
    return s;
}
