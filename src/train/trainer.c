/*
 * trainer.c — the pretraining loop behind `kiln train`.
 *
 * One optimizer step: zero the gradients; for each of K micro-steps draw B
 * windows, forward, the objective (kiln_train_opts.objective: its loss and
 * dlogits, or for cross-entropy the model's fused path), backward; average
 * gradients over processes; global-norm clip (the norm is logged before
 * clipping); AdamW with the scheduled learning rate. The loss and the
 * gradient are means over the global batch's tokens (or what the
 * objective's weigh counts instead: then all K micro-batches are drawn and
 * weighed before the first backward).
 *
 * Data order is world-size independent: step g uses the windows at global
 * positions pos .. pos+G-1 with G = B*K*world, and process r on micro-step
 * k takes rows [(k*world + r)*B, +B). The position, the optimizer state,
 * the rng and the metrics history are saved in every checkpoint, so a
 * resumed run continues the same trajectory bit for bit.
 *
 * Progress: a bar on a terminal, plain lines otherwise; one JSON object per
 * step in RUN/metrics.jsonl.
 */
#include "model/model.h"
#include "train/ckpt.h"
#include "train/dist.h"
#include "train/scaler.h"

#include <errno.h>
#include <stdarg.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

kiln_train_opts kiln_train_opts_default(void)
{
    return (kiln_train_opts){
        .batch = 8,
        .seq = 128,
        .grad_accum = 1,
        .lr = 3e-4,
        .min_lr = 3e-5,
        .warmup = 100,
        .schedule = KILN_SCHEDULE_COSINE,
        .steps = 0,
        .epochs = 1.0,
        .weight_decay = 0.1,
        .beta1 = 0.9,
        .beta2 = 0.95,
        .eps = 1e-8,
        .grad_clip = 1.0,
        .shuffle = true,
        .eval_every = 100,
        .eval_steps = 20,
        .save_every = 500,
        .keep_last = 3,
        .seed = 1337,
        .threads = 0,
        .log_every = 10,
        .progress = KILN_PROGRESS_AUTO,
        .precision = KILN_PRECISION_AUTO,
        .bf16_kernel = KILN_BF16_KERNEL_AUTO,
        .bf16_acts = true,
        .loss_scale = 0,
        .optim_kernel = KILN_OPTIM_KERNEL_AUTO,
        .dist = kiln_dist_opts_default(),
        .objective = kiln_objective_ce(),
    };
}

typedef struct trainer {
    kiln_ctx *ctx;
    kiln_train_opts o;
    char run_dir[1024];
    char data_real[PATH_MAX];
    char init_dir[1024]; /* --init-from resolved to a checkpoint */
    kiln_model *model;
    kiln_adamw *opt;
    kiln_data *data;
    kiln_loader *train;
    int32_t *val;       /* (n_val) validation tokens */
    size_t n_val;
    const kiln_objective *obj; /* opts.objective, NULL resolved to CE */
    int32_t *inputs;    /* (B, T); (K, B, T) when obj->weigh */
    int32_t *targets;   /* (B, T); (K, B, T) when obj->weigh */
    float *weights;     /* (K, B, T) when obj->weigh, else NULL */
    dist *dist;
    dist_zero *zero;    /* --zero 1: sharded AdamW (t->opt is then NULL) */
    int rank, world;
    int64_t step;       /* completed optimizer steps */
    int64_t total;      /* steps of the whole run */
    int64_t pos;        /* windows consumed (global data position) */
    int64_t G;          /* windows per optimizer step, all processes */
    kiln_rng rng;
    json_t *history;    /* array of metrics objects */
    FILE *metrics;
    double elapsed_before; /* wall seconds of earlier sessions */
    double t_start;        /* this session */
    double step_time;      /* seconds spent in steps this session */
    int64_t steps_timed;
    double val_loss;
    bool bar;
    bool bar_drawn;
    double last_draw;   /* when the bar was last drawn */
    int64_t bar_step;   /* the step it shows */
    char last_ckpt[1024];
    kiln_precision prec;  /* resolved compute precision */
    kiln_scaler scaler;   /* enabled for fp16 */
    double step_scale;    /* loss scale the last step ran with */
    bool step_skipped;    /* the last step was skipped (inf/NaN gradient) */
} trainer;

/* ---- distributed: the only place the trainer talks to other processes
 * (src/train/dist.h; world size 1 when not started by mpirun). ---------- */

static kiln_status tr_dist_init(trainer *t)
{
    kiln_status s = dist_init(t->ctx, &t->dist, &t->o.dist);
    if (s) return s;
    t->rank = dist_rank(t->dist);
    t->world = dist_world(t->dist);
    return KILN_OK;
}

/* Rank 0's initial (or resumed) weights to everyone. */
static kiln_status tr_dist_bcast_params(trainer *t)
{
    if (t->world == 1) return KILN_OK;
    return dist_bcast(t->ctx, t->dist, kiln_model_params(t->model),
                      kiln_model_num_params(t->model) * sizeof(float), 0);
}

/* Before the last micro-step's backward: open a round of gradient
 * averaging. */
static kiln_status tr_dist_grads_begin(trainer *t)
{
    if (t->world == 1) return KILN_OK;
    /* Only the ranges the backward reports final are read (the hook), so
     * the bf16 path's lazily zeroed weight-matrix gradients need not be
     * written out first: that backward stores them whole. */
    return dist_grads_begin(t->ctx, t->dist, model_grads_deferred(t->model),
                            kiln_model_num_params(t->model));
}

/* After it: every rank holds the mean of the ranks' gradients. */
static kiln_status tr_dist_grads_finish(trainer *t)
{
    if (t->world == 1) return KILN_OK;
    return dist_grads_finish(t->ctx, t->dist);
}

/* Sum of v[0..n) over processes, in place. */
static kiln_status tr_dist_sum(trainer *t, double *v, int n)
{
    if (t->world == 1) return KILN_OK;
    return dist_allreduce_sum_f64(t->ctx, t->dist, v, (size_t)n);
}

/* Stops only when some rank wants to (signal, --max-time), and then on
 * every rank after the same step, so the checkpoint is coherent. */
static kiln_status tr_dist_agree_stop(trainer *t, bool *stop)
{
    if (t->world == 1) return KILN_OK;
    double v = *stop ? 1 : 0;
    kiln_status s = dist_allreduce_max_f64(t->ctx, t->dist, &v, 1);
    *stop = v > 0;
    return s;
}

/* The other ranks wait here while rank 0 writes a checkpoint, under a
 * watchdog of at least an hour (large checkpoints), so that no rank runs
 * ahead into a collective whose normal timeout the write could exceed. */
static kiln_status tr_dist_after_save(trainer *t)
{
    if (t->world == 1) return KILN_OK;
    double keep = dist_timeout(t->dist);
    dist_set_timeout(t->dist, KILN_MAX(keep, 3600.0));
    kiln_status s = dist_barrier(t->ctx, t->dist);
    dist_set_timeout(t->dist, keep);
    return s;
}

/* A run saved at world W0 resumes at this world size with the same global
 * batch: B is rescaled to B0 * W0 / world unless --batch was changed. */
static kiln_status tr_dist_resume_batch(trainer *t)
{
    kiln_ctx *ctx = t->ctx;
    char *p = file_join(t->o.resume, "trainer_state.json");
    json_t *st = NULL;
    kiln_status s = js_load_file(ctx, p, &st);
    int64_t w0 = 1, b0 = t->o.batch;
    if (!s) s = js_get_int(ctx, st, "world_size", p, false, &w0);
    json_t *oj = st ? json_object_get(st, "options") : NULL;
    if (!s && oj) s = js_get_int(ctx, oj, "batch", p, false, &b0);
    if (!s && w0 != t->world && b0 == t->o.batch) {
        if (w0 < 1 || (b0 * w0) % t->world) {
            s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                          "%s: the run was saved at %lld ranks with --batch "
                          "%lld (%lld sequences per micro-step); %d ranks "
                          "cannot split that evenly: pass --batch and "
                          "--grad-accum so that batch x grad_accum x ranks "
                          "keeps the global batch",
                          p, (long long)w0, (long long)b0,
                          (long long)(b0 * w0), t->world);
        } else {
            t->o.batch = (int)(b0 * w0 / t->world);
            if (t->rank == 0)
                kiln_log(ctx, KILN_LOG_INFO,
                         "resuming a %lld-rank run on %d rank%s: --batch %lld "
                         "-> %d (same global batch)",
                (long long)w0, t->world, t->world > 1 ? "s" : "",
                (long long)b0, t->o.batch);
        }
    }
    json_decref(st);
    free(p);
    return s;
}

static void tr_dist_free(trainer *t, kiln_status s)
{
    dist_zero_free(t->zero);
    t->zero = NULL;
    /* After an error, leave without MPI_Finalize: the other ranks may be
     * inside a collective, and this process's non-zero exit makes mpirun
     * end the job. */
    if (s && t->world > 1) dist_abandon(t->dist);
    else dist_free(t->dist);
    t->dist = NULL;
}

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
static void say(trainer *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(trainer *t, const char *fmt, ...)
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

static void progress(trainer *t, double loss, double lr, double gnorm,
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
        say(t, "step %lld/%lld | loss %.4f | lr %.2e | grad_norm %.3f | "
               "%.0f tok/s | elapsed %s | ETA %s",
            (long long)t->step, (long long)t->total, loss, lr, gnorm, tps, el,
            eta);
    }
}

static void metrics_append(trainer *t, json_t *obj)
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
static kiln_status metrics_open(trainer *t)
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
    json_object_set_new(j, "objective", json_string(t->obj->name));
    return j;
}

static json_t *state_json(trainer *t, double lr)
{
    json_t *opts = options_json(t);
    json_t *rng = json_array();
    for (int i = 0; i < 4; i++) {
        char h[24];
        snprintf(h, sizeof h, "%016llx", (unsigned long long)t->rng.s[i]);
        json_array_append_new(rng, json_string(h));
    }
    int64_t nwin = kiln_loader_num_windows(t->train);
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

static kiln_status save(trainer *t, double lr)
{
    kiln_adamw *full = NULL; /* --zero 1: the shards, gathered on rank 0 */
    if (t->zero) {
        kiln_status zs = dist_zero_gather(t->ctx, t->zero, &full);
        if (zs) return zs;
    }
    if (t->rank != 0) return tr_dist_after_save(t);
    json_t *st = state_json(t, lr);
    if (!st) {
        kiln_adamw_free(full);
        return kiln_fail(t->ctx, KILN_ERR_NOMEM, "out of memory");
    }
    char *tokj = file_join(kiln_data_dir(t->data), "tokenizer.json");
    ckpt_save_args a = {.run_dir = t->run_dir,
                        .step = t->step,
                        .model = t->model,
                        .opt = t->zero ? full : t->opt,
                        .state = st,
                        .tokenizer_json = tokj,
                        .keep_last = t->o.keep_last};
    kiln_status s = ckpt_save(t->ctx, &a, t->last_ckpt, sizeof t->last_ckpt);
    kiln_adamw_free(full);
    free(tokj);
    json_decref(st);
    if (!s) say(t, "saved checkpoint %s", t->last_ckpt);
    return s ? s : tr_dist_after_save(t);
}

static kiln_status load_state(trainer *t, const char *dir)
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

/* ---- setup ----------------------------------------------------------- */

static kiln_status check_opts(kiln_ctx *ctx, const kiln_train_opts *o)
{
    if (!o->data)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "--data DIR is required");
    if (!o->out)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "--out DIR is required");
    if (o->config && o->init_from)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "give either --config or --init-from, not both");
    if (o->batch <= 0 || o->seq <= 0 || o->grad_accum <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "--batch, --seq and --grad-accum must be positive "
                         "(got %d, %d, %d)",
                         o->batch, o->seq, o->grad_accum);
    if (!(o->lr > 0) || o->min_lr < 0 || o->warmup < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "--lr must be positive and --min-lr, --warmup >= 0");
    if (o->steps < 0 || (o->steps == 0 && !(o->epochs > 0)))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "give --steps N > 0 or --epochs E > 0");
    if (o->beta1 < 0 || o->beta1 >= 1 || o->beta2 < 0 || o->beta2 >= 1 ||
        !(o->eps > 0) || o->weight_decay < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "--beta1/--beta2 must be in [0,1), --eps > 0, "
                         "--weight-decay >= 0");
    if (o->eval_every < 0 || o->eval_steps < 0 || o->save_every < 0 ||
        o->keep_last < 0 || o->log_every <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "--eval-every, --eval-steps, --save-every, "
                         "--keep-last must be >= 0 and --log-every > 0");
    if (!(o->loss_scale >= 0) || !isfinite(o->loss_scale))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.loss_scale = %g is not a positive finite "
                         "number (0 = the default, 65536)",
                         o->loss_scale);
    if (o->optim_kernel != KILN_OPTIM_KERNEL_AUTO &&
        o->optim_kernel != KILN_OPTIM_KERNEL_PORTABLE)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.optim_kernel = %d is not one of "
                         "KILN_OPTIM_KERNEL_AUTO, KILN_OPTIM_KERNEL_PORTABLE",
                         (int)o->optim_kernel);
    if (o->bf16_kernel < KILN_BF16_KERNEL_AUTO || o->bf16_kernel > KILN_BF16_KERNEL_AMX)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.bf16_kernel = %d is not one of "
                         "KILN_BF16_KERNEL_AUTO, _REF, _AVX512, _AMX",
                         (int)o->bf16_kernel);
    if (o->objective && (!o->objective->loss || !o->objective->name))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.objective has no %s; an objective needs a "
                         "name and a loss function (kiln.h, kiln_objective)",
                         o->objective->loss ? "name" : "loss function");
    return KILN_OK;
}

static kiln_status make_model(trainer *t)
{
    kiln_ctx *ctx = t->ctx;
    const kiln_train_opts *o = &t->o;
    kiln_status s;
    const char *from = NULL;
    if (o->resume) {
        if ((s = kiln_checkpoint_verify(ctx, o->resume))) return s;
        if ((s = kiln_model_load(ctx, o->resume, &t->model))) return s;
        from = o->resume;
    } else if (o->init_from) {
        /* a run directory stands for its latest checkpoint */
        char *cp = file_join(o->init_from, "config.json");
        char *lp = file_join(o->init_from, "latest");
        bool run = cp && lp && !file_exists(cp) && file_exists(lp);
        free(cp);
        free(lp);
        from = o->init_from;
        if (run) {
            if ((s = kiln_checkpoint_resolve(ctx, o->init_from, t->init_dir,
                                             sizeof t->init_dir)))
                return s;
            from = t->init_dir;
        }
        if ((s = kiln_checkpoint_verify(ctx, from))) return s;
        if ((s = kiln_model_load(ctx, from, &t->model))) return s;
    } else {
        kiln_config cfg = kiln_config_default();
        if (o->config) {
            if ((s = kiln_config_load(ctx, o->config, &cfg))) return s;
            from = o->config;
        } else {
            cfg.vocab_size = kiln_data_vocab_size(t->data);
            from = "the default config";
        }
        if ((s = kiln_config_validate(ctx, &cfg))) return s;
        if ((s = kiln_model_new(ctx, &cfg, &t->model))) return s;
        kiln_model_init_random(t->model, o->seed);
    }
    const kiln_config *cfg = kiln_model_config(t->model);
    int dv = kiln_data_vocab_size(t->data);
    if (cfg->vocab_size < dv)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "vocab size mismatch: the model (%s) has vocab_size "
                         "%d but the data in '%s' has vocab_size %d; use a "
                         "model config with vocab_size %d or tokenize the "
                         "data with the model's tokenizer",
                         from, cfg->vocab_size, o->data, dv, dv);
    if (o->seq > cfg->n_ctx)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "--seq %d exceeds the model's context length (n_ctx "
                         "%d in %s); use --seq %d or less",
                         o->seq, cfg->n_ctx, from, cfg->n_ctx);
    kiln_adamw_opts ao = {.beta1 = (float)o->beta1,
                          .beta2 = (float)o->beta2,
                          .eps = (float)o->eps,
                          .weight_decay = (float)o->weight_decay,
                          .kernel = o->optim_kernel};
    if (o->zero) { /* moments sharded across ranks (dist_zero.c) */
        if ((s = dist_zero_new(ctx, t->dist, t->model, &ao, &t->zero)))
            return s;
    } else {
        if ((s = kiln_adamw_new_for_model(ctx, t->model, &ao, &t->opt)))
            return s;
        /* gradients are averaged bucket by bucket during backward */
        if (t->world > 1)
            kiln_model_set_grad_hook(t->model, dist_grad_ready, t->dist);
    }
    if (o->resume) {
        char *p = file_join(o->resume, "optimizer.safetensors");
        s = t->zero ? dist_zero_load(ctx, t->zero, p)
                    : kiln_adamw_load(ctx, t->opt, p);
        free(p);
        if (s) return s;
    }
    kiln_precision_opts po = {.precision = o->precision,
                              .bf16_kernel = o->bf16_kernel,
                              .bf16_acts = o->bf16_acts};
    if ((s = kiln_model_set_precision_opts(ctx, t->model, &po))) return s;
    t->prec = kiln_model_precision(t->model);
    t->scaler = scaler_default(t->prec == KILN_PRECISION_FP16);
    /* opts.loss_scale: initial fp16 loss scale (tests force overflow with
     * a huge one; docs/precision.md). A checkpoint's scale wins on resume. */
    if (o->loss_scale > 0 && t->scaler.enabled) t->scaler.scale = o->loss_scale;
    t->step_scale = 1.0;
    return kiln_model_prepare(ctx, t->model, o->batch, o->seq);
}

static kiln_status setup(trainer *t)
{
    kiln_ctx *ctx = t->ctx;
    kiln_train_opts *o = &t->o;
    kiln_status s;
    if ((s = check_opts(ctx, o))) return s;
    t->obj = o->objective ? o->objective : kiln_objective_ce();
    if (o->threads > 0) {
        kiln_set_threads(ctx, o->threads);
        omp_set_num_threads(o->threads);
    }
    if ((s = tr_dist_init(t))) return s;
    if (o->zero < 0 || o->zero > 1)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "--zero %d is not supported; use 0 (off) or 1 "
                         "(shard the optimizer state)",
                         o->zero);
    if (o->resume && (s = tr_dist_resume_batch(t))) return s;
    if ((s = kiln_data_open(ctx, o->data, &t->data))) return s;
    if (!realpath(o->data, t->data_real)) snprintf(t->data_real, sizeof t->data_real, "%s", o->data);
    snprintf(t->run_dir, sizeof t->run_dir, "%s", o->out);
    if (kiln_data_tokens(t->data, KILN_SPLIT_TRAIN) == 0)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "'%s' has no training shards (train_files is empty)",
                         o->data);
    if ((s = kiln_loader_new(ctx, t->data, KILN_SPLIT_TRAIN, o->seq,
                             o->shuffle, o->seed, &t->train)))
        return s;
    if (!o->resume) {
        char *lp = file_join(o->out, "latest");
        bool has = lp && file_exists(lp);
        free(lp);
        if (has)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "'%s' already holds checkpoints of a run; "
                             "continue it with --resume %s, or choose "
                             "another --out",
                             o->out, o->out);
    }
    if ((s = make_model(t))) return s;
    if ((s = tr_dist_bcast_params(t))) return s;
    t->G = (int64_t)o->batch * o->grad_accum * t->world;
    int64_t nwin = kiln_loader_num_windows(t->train);
    t->total = o->steps > 0 ? o->steps
                            : (int64_t)ceil(o->epochs * (double)nwin / (double)t->G);
    if (t->total < 1) t->total = 1;
    t->history = json_array();
    kiln_rng_seed(&t->rng, o->seed);
    t->val_loss = NAN;
    if (o->resume && (s = load_state(t, o->resume))) return s;
    /* validation tokens: enough for eval_steps batches of B windows */
    size_t nv = kiln_data_tokens(t->data, KILN_SPLIT_VAL);
    if (o->eval_every > 0 && o->eval_steps > 0) {
        if (nv < 2) {
            kiln_log(ctx, KILN_LOG_WARN,
                     "'%s' has no validation split: no val_loss will be "
                     "reported (tokenize with --val-fraction)",
                     o->data);
        } else {
            /* eval_steps batches of the global batch (B x world), shared
             * out among the ranks by evaluate() */
            size_t want = (size_t)o->eval_steps * (size_t)o->batch *
                          (size_t)t->world * (size_t)o->seq + 1;
            t->n_val = KILN_MIN(nv, want);
            t->val = kiln_malloc(ctx, t->n_val * sizeof *t->val);
            if (!t->val) return KILN_ERR_NOMEM;
            kiln_data_read(t->data, KILN_SPLIT_VAL, 0, t->n_val, t->val);
        }
    }
    /* with a weigh, the whole step's micro-batches are drawn up front */
    size_t bt = (size_t)o->batch * (size_t)o->seq * (size_t)(t->obj->weigh ? o->grad_accum : 1);
    t->inputs = kiln_malloc(ctx, bt * sizeof *t->inputs);
    t->targets = kiln_malloc(ctx, bt * sizeof *t->targets);
    if (!t->inputs || !t->targets) return KILN_ERR_NOMEM;
    if (t->obj->weigh && !(t->weights = kiln_malloc(ctx, bt * sizeof *t->weights)))
        return KILN_ERR_NOMEM;
    if (t->rank == 0 && (s = file_mkdirs(ctx, o->out))) return s;
    return metrics_open(t);
}

/* ---- the loop -------------------------------------------------------- */

static kiln_status evaluate(trainer *t, double *out)
{
    /* Under MPI each rank evaluates its share of the validation windows
     * (stride T) and the sums are added: the same tokens, N times faster. */
    double sums[2] = {0, 0};
    size_t T = (size_t)t->o.seq, start = 0, end = t->n_val;
    if (t->world > 1 && t->n_val > 1) {
        size_t nw = (t->n_val - 1 + T - 1) / T, W = (size_t)t->world;
        size_t a = nw * (size_t)t->rank / W, b = nw * ((size_t)t->rank + 1) / W;
        start = KILN_MIN(a * T, t->n_val);
        end = KILN_MIN(b * T + 1, t->n_val);
    }
    kiln_status s = KILN_OK;
    if (end > start)
        s = kiln_eval_tokens(t->ctx, t->model, t->val + start, end - start,
                             t->o.batch, t->o.seq, &sums[0], &sums[1]);
    if (s) return s;
    if ((s = tr_dist_sum(t, sums, 2))) return s;
    *out = sums[1] > 0 ? sums[0] / sums[1] : NAN;
    return KILN_OK;
}

static kiln_status diverged(trainer *t, const char *what, double v, double lr)
{
    return kiln_fail(t->ctx, KILN_ERR_NUMERIC,
                     "%s is %g at step %lld (lr %.3g): training diverged; "
                     "lower --lr, raise --warmup or use --grad-clip, and "
                     "restart%s%s",
                     what, v, (long long)t->step + 1, lr,
                     t->last_ckpt[0] ? " or resume from " : "",
                     t->last_ckpt[0] ? t->last_ckpt : "");
}

/* Draws micro-step k's B windows of this process into in, tg (B, T). */
static void draw_micro(trainer *t, int k, int32_t *in, int32_t *tg)
{
    const int B = t->o.batch, T = t->o.seq;
    int64_t row0 = t->pos + ((int64_t)k * t->world + t->rank) * B;
    for (int b = 0; b < B; b++)
        kiln_loader_get(t->train, row0 + b, in + (size_t)b * T, tg + (size_t)b * T);
}

/* The objective's view of micro-step k (its rows in t's buffers). */
static kiln_objective_batch micro_batch(trainer *t, int k)
{
    size_t bt = (size_t)t->o.batch * (size_t)t->o.seq, off = t->obj->weigh ? (size_t)k * bt : 0;
    return (kiln_objective_batch){
        .B = t->o.batch,
        .T = t->o.seq,
        .V = kiln_model_config(t->model)->vocab_size,
        .tokens = t->inputs + off,
        .targets = t->targets + off,
        .weights = t->weights ? t->weights + off : NULL,
        .step = t->step,
        .micro = k,
    };
}

/* With a weigh: draws and weighs all K micro-batches of the step; *denom
 * is this process's share of the global batch's weight (the sum over the
 * processes / world), what its gradient sum is divided by before the
 * processes' gradients are averaged. */
static kiln_status weigh_step(trainer *t, double *denom)
{
    const int K = t->o.grad_accum;
    const size_t bt = (size_t)t->o.batch * (size_t)t->o.seq;
    double w = 0;
    kiln_status s;
    for (int k = 0; k < K; k++) {
        draw_micro(t, k, t->inputs + (size_t)k * bt, t->targets + (size_t)k * bt);
        kiln_objective_batch b = micro_batch(t, k);
        for (size_t i = 0; i < bt; i++) b.weights[i] = 1.0f;
        if ((s = t->obj->weigh(t->obj->user, t->ctx, &b, &w))) return s;
    }
    if ((s = tr_dist_sum(t, &w, 1))) return s;
    if (!(w > 0) || !isfinite(w))
        return kiln_fail(t->ctx, KILN_ERR_NUMERIC,
                         "objective '%s': the batch of step %lld weighs %g; it needs a "
                         "positive finite weight (a token with a target and weight > 0)",
                         t->obj->name, (long long)t->step + 1, w);
    *denom = w / t->world;
    return KILN_OK;
}

/* One optimizer step. */
static kiln_status train_step(trainer *t, double *loss, double *gnorm,
                              double *lr)
{
    kiln_ctx *ctx = t->ctx;
    const kiln_train_opts *o = &t->o;
    const kiln_objective *obj = t->obj;
    const int B = o->batch, T = o->seq, K = o->grad_accum;
    kiln_status s;
    kiln_model_zero_grad(t->model);
    double sums[2] = {0, 0}; /* loss sum, weight (tokens) */
    /* Each process's gradient is the mean over its own B*K*T tokens (or
     * its share of the objective's weight); averaging over processes makes
     * it the global-batch mean. */
    double denom = (double)B * K * T;
    if (obj->weigh && (s = weigh_step(t, &denom))) return s;
    const float scale = (float)(1.0 / denom) * scaler_loss_scale(&t->scaler);
    t->step_scale = scaler_loss_scale(&t->scaler);
    t->step_skipped = false;
    for (int k = 0; k < K; k++) {
        kiln_objective_batch mb = micro_batch(t, k);
        if (!obj->weigh) draw_micro(t, k, t->inputs, t->targets);
        float *logits;
        /* the weights are those of micro-step 0: keep their packed copies */
        if (k > 0) kiln_model_keep_weights(t->model);
        if ((s = kiln_model_forward(ctx, t->model, mb.tokens, B, T, &logits)))
            return s;
        if (k == K - 1 && !t->zero && (s = tr_dist_grads_begin(t))) return s;
        if (obj->fused_ce) {
            /* cross-entropy + backward (in bf16 the logits' gradient goes
             * straight into the LM head's packed operands) */
            s = kiln_model_backward_ce(ctx, t->model, mb.targets, mb.weights, scale, &sums[0],
                                       &sums[1]);
        } else {
            /* the objective's dlogits, in place, then the backward */
            s = obj->loss(obj->user, ctx, &mb, logits, scale, logits, &sums[0], &sums[1]);
            if (!s) s = kiln_model_backward(ctx, t->model, logits);
        }
        if (s) return s;
    }
    float *g = kiln_model_grads(t->model);
    size_t n = kiln_model_num_params(t->model);
    /* --zero 1: each rank receives the mean gradient of its shard only */
    if ((s = t->zero ? dist_zero_reduce_grads(ctx, t->zero, g)
                     : tr_dist_grads_finish(t)))
        return s;
    if ((s = tr_dist_sum(t, sums, 2))) return s;
    *loss = sums[0] / sums[1];
    *lr = kiln_lr_at(o->schedule, o->lr, o->min_lr, o->warmup, t->total, t->step);
    if (!isfinite(*loss)) return diverged(t, "the training loss", *loss, *lr);
    /* The update reads g once for the norm and once in the fused AdamW
     * pass; neither the unscale nor the clip rewrites g. With --zero 1
     * only this rank's shard of g (dist_zero_shard) is valid here; its
     * norm is reduced over the ranks, so every rank sees the same norm,
     * the same inf/NaN verdict and the same clip coefficient. */
    if (t->zero) {
        if ((s = dist_zero_grad_norm(ctx, t->zero, g, gnorm))) return s;
    } else {
        *gnorm = kiln_l2_norm(g, n);
    }
    float grad_mul = 1.0f;
    if (t->scaler.enabled) {
        /* fp16 loss scaling (torch.amp.GradScaler): the gradients carry the
         * scale. The norm of the scaled gradients is non-finite exactly
         * when one of them is: that is the inf/NaN check. The power-of-two
         * unscale is exact, so it is folded into the optimizer's read of
         * g (grad_mul) and the clip below works on the unscaled norm. On
         * inf/NaN the step is skipped and the scale halved. */
        bool inf = !isfinite(*gnorm);
        grad_mul = scaler_inv_scale(&t->scaler); /* before the update */
        if (!inf) *gnorm /= t->step_scale;
        if (!scaler_update(&t->scaler, inf)) {
            t->step_skipped = true;
            say(t, "step %lld: skipped: inf/NaN gradient at loss scale %g; loss scale now %g",
                (long long)t->step + 1, t->step_scale, t->scaler.scale);
            t->pos += t->G;
            t->step++;
            return KILN_OK;
        }
    }
    if (!isfinite(*gnorm)) return diverged(t, "the gradient norm", *gnorm, *lr);
    grad_mul *= kiln_clip_grad_coef(*gnorm, o->grad_clip);
    if (t->zero) {
        if ((s = dist_zero_update_scaled(ctx, t->zero, kiln_model_params(t->model),
                                         g, (float)*lr, grad_mul)))
            return s;
    } else {
        /* for bf16, also the packed weight copies of the next forward */
        kiln_model_adamw_step(t->model, t->opt, g, (float)*lr, grad_mul);
    }
    t->pos += t->G;
    t->step++;
    return KILN_OK;
}

static void trainer_free(trainer *t, kiln_status s)
{
    if (t->metrics) fclose(t->metrics);
    json_decref(t->history);
    free(t->inputs);
    free(t->targets);
    free(t->weights);
    free(t->val);
    kiln_loader_free(t->train);
    kiln_data_close(t->data);
    kiln_adamw_free(t->opt);
    kiln_model_free(t->model);
    tr_dist_free(t, s);
}

static void banner(trainer *t)
{
    const kiln_config *c = kiln_model_config(t->model);
    const kiln_train_opts *o = &t->o;
    int64_t nwin = kiln_loader_num_windows(t->train);
    say(t, "model: %s L=%d C=%d NH=%d V=%d n_ctx=%d, %.2fM parameters",
        c->arch == KILN_ARCH_LLAMA ? "llama" : "gpt2", c->n_layer, c->n_embd,
        c->n_head, c->vocab_size, c->n_ctx,
        (double)kiln_model_num_params(t->model) / 1e6);
    say(t, "data: %s, %zu train tokens (%lld windows of %d+1), %zu val tokens",
        o->data, kiln_data_tokens(t->data, KILN_SPLIT_TRAIN), (long long)nwin,
        o->seq, kiln_data_tokens(t->data, KILN_SPLIT_VAL));
    say(t, "batch: %d x %d seq x %d accum x %d proc = %lld tokens/step; %lld "
           "steps (%.2f epochs); lr %.2e %s, warmup %lld, min %.2e",
        o->batch, o->seq, o->grad_accum, t->world, (long long)(t->G * o->seq),
        (long long)t->total, (double)t->total * (double)t->G / (double)nwin,
        o->lr, kiln_schedule_name(o->schedule), (long long)o->warmup, o->min_lr);
    size_t np = kiln_model_num_params(t->model);
    if (t->zero)
        say(t, "optimizer: AdamW state %.2f MB per rank (ZeRO-1 over %d "
               "rank%s; %.2f MB unsharded)",
            (double)dist_zero_state_bytes(t->zero) / 1e6, t->world,
            t->world > 1 ? "s" : "", 8.0 * (double)np / 1e6);
    else
        say(t, "optimizer: AdamW state %.2f MB per rank%s", 8.0 * (double)np / 1e6,
            t->world > 1 ? " (use --zero 1 to shard it)" : "");
    char cpu[256];
    kiln_precision_describe(cpu, sizeof cpu);
    say(t, "precision: %s matrix products, fp32 master weights and AdamW%s [%s]",
        kiln_precision_name(t->prec),
        t->prec == KILN_PRECISION_FP16 ? ", dynamic loss scaling" : "", cpu);
    if (o->resume)
        say(t, "resumed from %s at step %lld", o->resume, (long long)t->step);
}

kiln_status kiln_train(kiln_ctx *ctx, const kiln_train_opts *opts,
                       kiln_train_result *res)
{
    trainer tr;
    memset(&tr, 0, sizeof tr);
    trainer *t = &tr;
    t->ctx = ctx;
    t->o = *opts;
    t->val_loss = NAN;
    memset(res, 0, sizeof *res);
    res->val_loss = NAN;
    t->t_start = kiln_time_now();
    kiln_status s = setup(t);
    if (s) {
        res->rank = t->rank;
        res->world_size = t->world ? t->world : 1;
        trainer_free(t, s);
        return s;
    }
    /* Open MPI gives every rank a pseudo-terminal even when mpirun's
     * output goes to a file, so under MPI "auto" means plain lines. */
    t->bar = t->o.progress == KILN_PROGRESS_BAR ||
             (t->o.progress == KILN_PROGRESS_AUTO && t->world == 1 &&
              isatty(STDOUT_FILENO));
    banner(t);
    if (t->o.resume) snprintf(t->last_ckpt, sizeof t->last_ckpt, "%s", t->o.resume);
    double loss = NAN, lr = 0, gnorm = 0;
    bool stopped = false;
    if (t->step == 0 && t->val && !opts->resume) {
        if ((s = evaluate(t, &t->val_loss))) goto out;
        say(t, "step 0: val_loss %.4f (perplexity %.2f)", t->val_loss,
            exp(t->val_loss));
        json_t *m = json_pack("{s:I,s:f}", "step", (json_int_t)0, "val_loss",
                              t->val_loss);
        if (t->rank == 0) metrics_append(t, m);
        json_decref(m);
    }
    while (t->step < t->total) {
        double t0 = kiln_time_now();
        dist_stats_reset(t->dist);
        if ((s = train_step(t, &loss, &gnorm, &lr))) goto out;
        double dt = kiln_time_now() - t0;
        dist_stats comm;
        dist_stats_get(t->dist, &comm);
        t->step_time += dt;
        t->steps_timed++;
        double tps = (double)(t->G * t->o.seq) / (t->step_time / (double)t->steps_timed);
        bool last = t->step == t->total;
        json_t *m = json_pack(
            "{s:I,s:f,s:f,s:f,s:f,s:f,s:f,s:I}", "step", (json_int_t)t->step,
            "loss", loss, "lr", lr, "grad_norm", isfinite(gnorm) ? gnorm : 0.0, "tokens_per_s",
            (double)(t->G * t->o.seq) / dt, "elapsed",
            t->elapsed_before + kiln_time_now() - t->t_start, "epoch",
            (double)t->pos / (double)kiln_loader_num_windows(t->train),
            "tokens", (json_int_t)(t->pos * t->o.seq));
        /* communication: seconds this rank waited on other ranks */
        json_object_set_new(m, "world_size", json_integer(t->world));
        json_object_set_new(m, "comm_s", json_real(comm.wait_s));
        json_object_set_new(m, "comm_frac", json_real(dt > 0 ? comm.wait_s / dt : 0));
        if (!isfinite(gnorm)) /* a skipped fp16 step: JSON has no inf/NaN */
            json_object_set_new(m, "grad_norm", json_null());
        if (t->scaler.enabled) {
            json_object_set_new(m, "loss_scale", json_real(t->step_scale));
            json_object_set_new(m, "skipped", json_boolean(t->step_skipped));
        }
        bool stop = false;
        if (t->o.on_step) {
            kiln_step_info si = {
                .step = t->step,
                .total = t->total,
                .loss = loss,
                .lr = lr,
                .grad_norm = isfinite(gnorm) ? gnorm : NAN,
                .loss_scale = t->scaler.enabled ? t->step_scale : 1.0,
                .skipped = t->scaler.enabled && t->step_skipped,
                .tokens_per_s = (double)(t->G * t->o.seq) / dt,
            };
            stop = !t->o.on_step(t->o.on_step_user, &si);
        }
        stop = stop || (t->o.stop_flag && *t->o.stop_flag) ||
                    (t->o.stop_at > 0 && t->step >= t->o.stop_at) ||
                    (t->o.max_time > 0 && kiln_time_now() - t->t_start >= t->o.max_time);
        if ((s = tr_dist_agree_stop(t, &stop))) {
            json_decref(m);
            goto out;
        }
        if (t->val && ((t->o.eval_every > 0 && t->step % t->o.eval_every == 0) || last)) {
            if ((s = evaluate(t, &t->val_loss))) {
                json_decref(m);
                goto out;
            }
            json_object_set_new(m, "val_loss", json_real(t->val_loss));
            say(t, "step %lld: val_loss %.4f (perplexity %.2f)",
                (long long)t->step, t->val_loss, exp(t->val_loss));
        }
        if (t->rank == 0) metrics_append(t, m);
        json_decref(m);
        progress(t, loss, lr, gnorm, tps);
        if (last || stop ||
            (t->o.save_every > 0 && t->step % t->o.save_every == 0)) {
            if ((s = save(t, lr))) goto out;
        }
        if (stop && !last) {
            stopped = true;
            break;
        }
    }
out:
    if (t->bar_drawn) {
        fputc('\n', stdout);
        fflush(stdout);
    }
    res->step = t->step;
    res->loss = loss;
    res->val_loss = t->val_loss;
    res->interrupted = stopped;
    snprintf(res->checkpoint, sizeof res->checkpoint, "%.1000s", t->last_ckpt);
    res->rank = t->rank;
    res->world_size = t->world;
    res->skipped_steps = t->scaler.skipped_steps;
    res->loss_scale = scaler_loss_scale(&t->scaler);
    trainer_free(t, s);
    return s;
}
