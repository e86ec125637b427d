/*
 * trainer_io.c — the trainer's run directory and console: the banner, the
 * progress bar or lines, RUN/metrics.jsonl, and trainer_state.json (written
 * into each checkpoint, read back on resume, and the options a resumed run
 * starts from: kiln_train_opts_load), and the freeze patterns a run
 * applies (opts.freeze, or on resume the checkpoint's). The loop is in
 * trainer.c.
 */
#include "train/trainer_int.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- output ---------------------------------------------------------- */

static void fmt_duration(char *buf, size_t cap, double s)
{
    if (!(s >= 0) || s > 1e8) {
        snprintf(buf, cap, "?");
        return;
    }
    long x = (long)(s + 0.5);
    if (x >= 3600)
        snprintf(buf, cap, "%ldh%02ldm", x / 3600, (x / 60) % 60);
    else if (x >= 60)
        snprintf(buf, cap, "%ldm%02lds", x / 60, x % 60);
    else
        snprintf(buf, cap, "%lds", x);
}

/* Prints a whole line, clearing a drawn progress bar first. */
void tr_say(trainer *t, const char *fmt, ...)
{
    if (t->rank != 0 || t->o.progress == KILN_PROGRESS_NONE) return;
    if (t->bar_drawn) {
        /* the finished bar stays on screen; a running one is redrawn
         * below the message */
        fputs(t->bar_step >= t->total ? "\n" : "\r\033[K", stdout);
        t->bar_drawn = false;
    }
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

void tr_fmt_stats(const trainer *t, const char *prefix, const double *vals, char *buf,
                  size_t cap)
{
    size_t n = 0;
    buf[0] = 0;
    for (int i = 0; i < t->obj->n_metrics && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, " | %s%s %.4f", prefix, t->obj->metric_names[i],
                              vals[i]);
}

void tr_progress(trainer *t, double loss, double lr, double gnorm,
                     double tps)
{
    if (t->rank != 0 || t->o.progress == KILN_PROGRESS_NONE) return;
    double per = t->steps_timed ? t->step_time / (double)t->steps_timed : 0;
    char eta[32];
    fmt_duration(eta, sizeof eta, per * (double)(t->total - t->step));
    if (t->bar) {
        /* redraw at most 10 times a second (and always the last step) */
        double now = kiln_time_now();
        if (t->bar_drawn && t->step < t->total && now - t->last_draw < 0.1) return;
        t->last_draw = now;
        t->bar_step = t->step;
        int width = 24;
        double frac = (double)t->step / (double)t->total;
        int fill = (int)(frac * width);
        char bar[64];
        for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : '.';
        bar[width] = 0;
        char val[32] = "";
        if (!isnan(t->val_loss)) snprintf(val, sizeof val, " val %.4f", t->val_loss);
        printf("\r\033[Kstep %lld/%lld [%s] %3.0f%% loss %.4f%s lr %.2e "
               "%.0f tok/s ETA %s",
               (long long)t->step, (long long)t->total, bar, 100 * frac, loss,
               val, lr, tps, eta);
        fflush(stdout);
        t->bar_drawn = true;
        return;
    }
    if (t->step % t->o.log_every == 0 || t->step == 1 || t->step == t->total) {
        char el[32];
        fmt_duration(el, sizeof el, t->elapsed_before + kiln_time_now() - t->t_start);
        char st[512] = "";
        if (t->stat_have) tr_fmt_stats(t, "", t->stat_vals, st, sizeof st);
        tr_say(t, "step %lld/%lld | loss %.4f%s | lr %.2e | grad_norm %.3f | "
               "%.0f tok/s | elapsed %s | ETA %s",
            (long long)t->step, (long long)t->total, loss, st, lr, gnorm, tps, el,
            eta);
    }
}

void tr_metrics_append(trainer *t, json_t *obj)
{
    json_array_append(t->history, obj);
    if (t->metrics) {
        char *line = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
        if (line) {
            fprintf(t->metrics, "%s\n", line);
            fflush(t->metrics);
            free(line);
        }
    }
}

/* Rewrites RUN/metrics.jsonl from the history (after a resume, dropping
 * lines a killed run wrote after its last checkpoint) and opens it for
 * appending. */
kiln_status tr_metrics_open(trainer *t)
{
    if (t->rank != 0) return KILN_OK;
    char *path = file_join(t->run_dir, "metrics.jsonl");
    if (!path) return kiln_fail(t->ctx, KILN_ERR_NOMEM, "out of memory");
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t i;
    json_t *v;
    json_array_foreach(t->history, i, v)
    {
        char *line = json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER);
        size_t n = line ? strlen(line) : 0;
        while (buf && len + n + 2 > cap) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) {
                free(buf);
                buf = NULL;
            }
            buf = nb;
        }
        if (buf && line) {
            memcpy(buf + len, line, n);
            len += n;
            buf[len++] = '\n';
        }
        free(line);
    }
    kiln_status s = buf ? file_write_atomic(t->ctx, path, buf, len)
                        : kiln_fail(t->ctx, KILN_ERR_NOMEM, "out of memory");
    free(buf);
    if (!s) {
        t->metrics = fopen(path, "a");
        if (!t->metrics)
            s = kiln_fail(t->ctx, KILN_ERR_IO, "cannot open '%s': %s", path,
                          strerror(errno));
    }
    free(path);
    return s;
}

/* ---- state ----------------------------------------------------------- */

static json_t *options_json(const trainer *t)
{
    const kiln_train_opts *o = &t->o;
    json_t *j = json_object();
    json_object_set_new(j, "data", json_string(t->data_real));
    json_object_set_new(j, "batch", json_integer(o->batch));
    json_object_set_new(j, "seq", json_integer(o->seq));
    json_object_set_new(j, "grad_accum", json_integer(o->grad_accum));
    json_object_set_new(j, "lr", json_real(o->lr));
    json_object_set_new(j, "min_lr", json_real(o->min_lr));
    json_object_set_new(j, "warmup", json_integer(o->warmup));
    json_object_set_new(j, "schedule", json_string(kiln_schedule_name(o->schedule)));
    json_object_set_new(j, "steps", json_integer(t->total));
    json_object_set_new(j, "epochs", json_real(o->epochs));
    json_object_set_new(j, "weight_decay", json_real(o->weight_decay));
    json_object_set_new(j, "beta1", json_real(o->beta1));
    json_object_set_new(j, "beta2", json_real(o->beta2));
    json_object_set_new(j, "eps", json_real(o->eps));
    json_object_set_new(j, "grad_clip", json_real(o->grad_clip));
    json_object_set_new(j, "shuffle", json_boolean(o->shuffle));
    json_object_set_new(j, "eval_every", json_integer(o->eval_every));
    json_object_set_new(j, "eval_steps", json_integer(o->eval_steps));
    json_object_set_new(j, "save_every", json_integer(o->save_every));
    json_object_set_new(j, "keep_last", json_integer(o->keep_last));
    json_object_set_new(j, "log_every", json_integer(o->log_every));
    char seed[24];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)o->seed);
    json_object_set_new(j, "seed", json_string(seed));
    json_object_set_new(j, "precision", json_string(kiln_precision_name(t->prec)));
    if (t->prec_auto) /* why AUTO chose it (not read back: a resume decides again) */
        json_object_set_new(
            j, "precision_auto",
            json_pack("{s:s, s:s, s:f, s:f, s:b}", "choice",
                      kiln_precision_name(t->auto_info.choice), "reason", t->auto_info.reason,
                      "fp32_gflops", t->auto_info.fp32_gflops, "bf16_gflops",
                      t->auto_info.bf16_gflops, "cached", t->auto_info.cached));
    json_object_set_new(j, "objective", json_string(t->obj->name));
    if (t->n_freeze > 0) {
        json_t *fz = json_array();
        for (int i = 0; i < t->n_freeze; i++) json_array_append_new(fz, json_string(t->freeze[i]));
        json_object_set_new(j, "freeze", fz);
    }
    return j;
}

json_t *tr_state_json(trainer *t, double lr)
{
    json_t *opts = options_json(t);
    json_t *rng = json_array();
    for (int i = 0; i < 4; i++) {
        char h[24];
        snprintf(h, sizeof h, "%016llx", (unsigned long long)t->rng.s[i]);
        json_array_append_new(rng, json_string(h));
    }
    int64_t nwin = tr_num_windows(t);
    json_t *st = json_object();
    json_object_set_new(st, "format", json_string("kiln-trainer-state"));
    json_object_set_new(st, "version", json_integer(1));
    json_object_set_new(st, "step", json_integer(t->step));
    json_object_set_new(st, "epoch", json_integer(t->pos / nwin));
    json_object_set_new(st, "data_position", json_integer(t->pos));
    json_object_set_new(st, "windows_per_epoch", json_integer(nwin));
    json_object_set_new(st, "tokens_seen",
                        json_integer(t->pos * (json_int_t)t->o.seq));
    json_object_set_new(st, "world_size", json_integer(t->world));
    json_object_set_new(st, "rng", rng);
    json_object_set_new(
        st, "schedule",
        json_pack("{s:s,s:f,s:f,s:I,s:I,s:f}", "name",
                  kiln_schedule_name(t->o.schedule), "lr", t->o.lr, "min_lr",
                  t->o.min_lr, "warmup", (json_int_t)t->o.warmup,
                  "total_steps", (json_int_t)t->total, "current_lr", lr));
    json_object_set_new(st, "elapsed",
                        json_real(t->elapsed_before + kiln_time_now() - t->t_start));
    json_object_set_new(st, "options", opts);
    json_object_set(st, "metrics", t->history);
    json_object_set_new(st, "precision", json_string(kiln_precision_name(t->prec)));
    json_object_set_new(st, "scaler", scaler_to_json(&t->scaler));
    return st;
}

kiln_status tr_load_state(trainer *t, const char *dir)
{
    kiln_ctx *ctx = t->ctx;
    char *p = file_join(dir, "trainer_state.json");
    json_t *st = NULL;
    kiln_status s = js_load_file(ctx, p, &st);
    if (s) goto done;
    const char *fmt = NULL;
    int64_t step = 0, pos = 0;
    double elapsed = 0;
    if ((s = js_get_str(ctx, st, "format", p, true, &fmt))) goto done;
    if (strcmp(fmt, "kiln-trainer-state")) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: format is \"%s\"", p, fmt);
        goto done;
    }
    int64_t version = 1;
    if ((s = js_get_int(ctx, st, "version", p, false, &version))) goto done;
    if (version != 1) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "%s: version %lld is not supported (this kiln reads 1)", p,
                      (long long)version);
        goto done;
    }
    if ((s = js_get_int(ctx, st, "step", p, true, &step)) ||
        (s = js_get_int(ctx, st, "data_position", p, true, &pos)) ||
        (s = js_get_double(ctx, st, "elapsed", p, false, &elapsed)))
        goto done;
    json_t *rng = json_object_get(st, "rng");
    json_t *hist = json_object_get(st, "metrics");
    if (json_array_size(rng) != 4 || !json_is_array(hist) || step < 0 || pos < 0) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "%s: \"rng\", \"metrics\", \"step\" or \"data_position\" "
                      "is malformed",
                      p);
        goto done;
    }
    for (int i = 0; i < 4; i++) {
        const char *h = json_string_value(json_array_get(rng, (size_t)i));
        char *end = NULL;
        if (h) {
            errno = 0;
            t->rng.s[i] = strtoull(h, &end, 16);
        }
        if (!h || !*h || *end || errno) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: \"rng\" entry %d is not a hexadecimal number",
                          p, i);
            goto done;
        }
    }
    if (!(t->rng.s[0] | t->rng.s[1] | t->rng.s[2] | t->rng.s[3])) {
        /* an all-zero xoshiro state yields zeros forever */
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: \"rng\" state is all zero", p);
        goto done;
    }
    t->step = step;
    t->pos = pos;
    t->elapsed_before = elapsed;
    json_decref(t->history);
    t->history = json_deep_copy(hist);
    /* keep only entries up to the checkpoint's step */
    size_t n = json_array_size(t->history);
    while (n > 0) {
        json_t *last = json_array_get(t->history, n - 1);
        if (json_integer_value(json_object_get(last, "step")) <= step) break;
        json_array_remove(t->history, --n);
    }
    /* fp16: continue the loss scale and its growth counter */
    json_t *sj = json_object_get(st, "scaler");
    if (sj && t->prec == KILN_PRECISION_FP16) {
        char what[1100];
        snprintf(what, sizeof what, "%s: \"scaler\"", p);
        if ((s = scaler_from_json(ctx, sj, what, &t->scaler))) goto done;
        t->scaler.enabled = true;
    }
    int64_t ot = t->zero ? dist_zero_t(t->zero) : kiln_adamw_t(t->opt);
    if (ot != step)
        kiln_log(ctx, KILN_LOG_DEBUG, "optimizer t %lld, step %lld",
                 (long long)ot, (long long)step);
done:
    json_decref(st);
    free(p);
    return s;
}

/* Freezes the tensors opts.freeze names (kiln_model_set_trainable). On
 * resume the checkpoint's patterns hold: given none, they are taken over;
 * given others, that is an error (the optimizer state has moments for
 * exactly the trainable tensors of the run that wrote it). */
kiln_status tr_freeze(trainer *t)
{
    kiln_ctx *ctx = t->ctx;
    const kiln_train_opts *o = &t->o;
    t->freeze = o->freeze;
    t->n_freeze = o->freeze ? o->n_freeze : 0;
    if (o->n_freeze < 0 || (o->n_freeze > 0 && !o->freeze))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.n_freeze = %d needs kiln_train_opts.freeze to "
                         "point at that many patterns", o->n_freeze);
    if (o->resume) {
        char *p = file_join(o->resume, "trainer_state.json");
        json_t *st = NULL;
        kiln_status s = p ? js_load_file(ctx, p, &st) : KILN_ERR_NOMEM;
        free(p);
        if (s) return s;
        json_t *fz = json_object_get(json_object_get(st, "options"), "freeze");
        t->ckpt_opts = json_incref(fz); /* NULL: a run without freezing */
        json_decref(st);
        size_t nk = json_array_size(fz);
        if (t->n_freeze == 0 && nk > 0) {
            t->freeze_buf = calloc(nk, sizeof *t->freeze_buf);
            if (!t->freeze_buf) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            for (size_t i = 0; i < nk; i++) {
                t->freeze_buf[i] = json_string_value(json_array_get(fz, i));
                if (!t->freeze_buf[i])
                    return kiln_fail(ctx, KILN_ERR_FORMAT,
                                     "%s/trainer_state.json: options.freeze[%zu] is not a "
                                     "string", o->resume, i);
            }
            t->freeze = t->freeze_buf;
            t->n_freeze = (int)nk;
        } else if (t->n_freeze > 0) {
            bool same = nk == (size_t)t->n_freeze;
            for (size_t i = 0; same && i < nk; i++) {
                const char *c = json_string_value(json_array_get(fz, i));
                same = c && t->freeze[i] && !strcmp(c, t->freeze[i]);
            }
            if (!same)
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                 "kiln_train_opts.freeze differs from the patterns "
                                 "the checkpoint %s was trained with (%zu of them, in "
                                 "trainer_state.json options.freeze); resume with the same "
                                 "ones, or leave them out to take the checkpoint's",
                                 o->resume, nk);
        }
    }
    if (t->n_freeze > 0 && o->zero)
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "kiln_train_opts.freeze with kiln_train_opts.zero = 1 is not "
                         "supported yet; train frozen tensors with kiln_train_opts.zero = 0");
    for (int i = 0; i < t->n_freeze; i++) {
        if (!t->freeze[i])
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_train_opts.freeze[%d] is NULL", i);
        kiln_status s = kiln_model_set_trainable(ctx, t->model, t->freeze[i], false, NULL);
        if (s) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", kiln_errmsg(ctx));
            return kiln_fail(ctx, s, "kiln_train_opts.freeze[%d]: %s", i, msg);
        }
    }
    /* the frozen ranges, in block order (the registry's), for the allreduce */
    int nt = kiln_model_num_tensors(t->model);
    t->fz_off = calloc((size_t)nt + 1, sizeof *t->fz_off);
    t->fz_len = calloc((size_t)nt + 1, sizeof *t->fz_len);
    if (!t->fz_off || !t->fz_len) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    t->nfz = 0;
    for (int i = 0; i < nt; i++) {
        const kiln_tensor_info *ti = kiln_model_tensor(t->model, i);
        if (ti->trainable) continue;
        t->fz_off[t->nfz] = ti->offset;
        t->fz_len[t->nfz++] = ti->numel;
    }
    return KILN_OK;
}

kiln_status kiln_train_opts_load(kiln_ctx *ctx, const char *ckpt_dir,
                                 kiln_train_opts *o, char *data_buf,
                                 size_t cap)
{
    char *p = file_join(ckpt_dir, "trainer_state.json");
    json_t *st = NULL;
    kiln_status s = js_load_file(ctx, p, &st);
    if (s) {
        free(p);
        return s;
    }
    json_t *j = json_object_get(st, "options");
    int64_t i64;
    double f;
    bool b;
    const char *str;
#define GETI(key, field)                                                   \
    if (!s && !(s = js_get_int(ctx, j, key, p, true, &i64))) o->field = i64
#define GETF(key, field)                                                   \
    if (!s && !(s = js_get_double(ctx, j, key, p, true, &f))) o->field = f
    if (!json_is_object(j))
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: \"options\" is missing", p);
    GETI("batch", batch);
    GETI("seq", seq);
    GETI("grad_accum", grad_accum);
    GETF("lr", lr);
    GETF("min_lr", min_lr);
    GETI("warmup", warmup);
    GETI("steps", steps);
    GETF("epochs", epochs);
    GETF("weight_decay", weight_decay);
    GETF("beta1", beta1);
    GETF("beta2", beta2);
    GETF("eps", eps);
    GETF("grad_clip", grad_clip);
    GETI("eval_every", eval_every);
    GETI("eval_steps", eval_steps);
    GETI("save_every", save_every);
    GETI("keep_last", keep_last);
    GETI("log_every", log_every);
#undef GETI
#undef GETF
    if (!s && !(s = js_get_bool(ctx, j, "shuffle", p, true, &b))) o->shuffle = b;
    if (!s && !(s = js_get_str(ctx, j, "schedule", p, true, &str))) {
        int k = kiln_schedule_parse(str);
        if (k < 0) s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: bad schedule", p);
        else o->schedule = (kiln_schedule)k;
    }
    if (!s && !(s = js_get_str(ctx, j, "seed", p, true, &str)))
        o->seed = strtoull(str, NULL, 10);
    str = NULL;
    if (!s && !(s = js_get_str(ctx, j, "precision", p, false, &str)) && str) {
        int k = kiln_precision_parse(str);
        if (k < 0)
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: \"precision\" is \"%s\"; expected fp32, bf16 or fp16", p, str);
        else o->precision = (kiln_precision)k;
    }
    /* a built-in objective is restored by name; one of the caller's own
     * stays what the caller set (older checkpoints have no name: CE) */
    str = NULL;
    if (!s && !(s = js_get_str(ctx, j, "objective", p, false, &str)) && str &&
        kiln_objective_builtin(str))
        o->objective = kiln_objective_builtin(str);
    if (!s && !(s = js_get_str(ctx, j, "data", p, true, &str))) {
        snprintf(data_buf, cap, "%s", str);
        o->data = data_buf;
    }
    json_decref(st);
    free(p);
    return s;
}

void tr_banner(trainer *t)
{
    const kiln_config *c = kiln_model_config(t->model);
    const kiln_train_opts *o = &t->o;
    int64_t nwin = tr_num_windows(t);
    tr_say(t, "model: %s L=%d C=%d NH=%d V=%d n_ctx=%d, %.2fM parameters",
        c->arch == KILN_ARCH_LLAMA ? "llama" : "gpt2", c->n_layer, c->n_embd,
        c->n_head, c->vocab_size, c->n_ctx,
        (double)kiln_model_num_params(t->model) / 1e6);
    if (o->rows)
        tr_say(t, "data: %s, %lld train rows of %d positions, %lld val rows",
            o->data ? o->data : "rows", (long long)nwin, o->seq,
            (long long)(o->val_rows ? o->val_rows->rows : 0));
    else
        tr_say(t, "data: %s, %zu train tokens (%lld windows of %d+1), %zu val tokens",
            o->data, kiln_data_tokens(t->data, KILN_SPLIT_TRAIN), (long long)nwin,
            o->seq, kiln_data_tokens(t->data, KILN_SPLIT_VAL));
    tr_say(t, "batch: %d x %d seq x %d accum x %d proc = %lld tokens/step; %lld "
           "steps (%.2f epochs); lr %.2e %s, warmup %lld, min %.2e",
        o->batch, o->seq, o->grad_accum, t->world, (long long)(t->G * o->seq),
        (long long)t->total, (double)t->total * (double)t->G / (double)nwin,
        o->lr, kiln_schedule_name(o->schedule), (long long)o->warmup, o->min_lr);
    size_t np = kiln_model_num_params(t->model);
    if (t->zero)
        tr_say(t, "optimizer: AdamW state %.2f MB per rank (ZeRO-1 over %d "
               "rank%s; %.2f MB unsharded)",
            (double)dist_zero_state_bytes(t->zero) / 1e6, t->world,
            t->world > 1 ? "s" : "", 8.0 * (double)np / 1e6);
    else
        tr_say(t, "optimizer: AdamW state %.2f MB per rank%s",
            8.0 * (double)kiln_adamw_state_size(t->opt) / 1e6,
            t->world > 1 ? " (unsharded; ZeRO-1 would shard it)" : "");
    if (t->n_freeze > 0) {
        int nt = 0, nf = 0;
        for (int i = 0; i < kiln_model_num_tensors(t->model); i++, nt++)
            nf += !kiln_model_tensor(t->model, i)->trainable;
        size_t tr = kiln_model_num_trainable(t->model);
        tr_say(t, "frozen: %d of %d tensors (%.2fM parameters; %.2fM trainable) by %d pattern%s",
            nf, nt, (double)(np - tr) / 1e6, (double)tr / 1e6, t->n_freeze,
            t->n_freeze > 1 ? "s" : "");
    }
    char cpu[256];
    kiln_precision_describe(cpu, sizeof cpu);
    tr_say(t, "precision: %s matrix products, fp32 master weights and AdamW%s [%s]",
        kiln_precision_name(t->prec),
        t->prec == KILN_PRECISION_FP16 ? ", dynamic loss scaling" : "", cpu);
    if (o->resume)
        tr_say(t, "resumed from %s at step %lld", o->resume, (long long)t->step);
}

