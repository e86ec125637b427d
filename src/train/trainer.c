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
 * Progress (trainer_io.c): a bar on a terminal, plain lines otherwise; one JSON object per
 * step in RUN/metrics.jsonl.
 */
#include "train/ckpt.h"
#include "train/sparsity.h"
#include "train/trainer_int.h"

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
    return dist_bcast(t->ctx, t->dist, model_params_write(t->model),
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
                          "%s: the run was saved at %lld ranks with "
                          "kiln_train_opts.batch = %lld (%lld sequences per "
                          "micro-step); %d ranks cannot split that evenly: "
                          "set kiln_train_opts.batch and kiln_train_opts.grad_accum "
                          "so that batch x grad_accum x ranks keeps the global "
                          "batch",
                          p, (long long)w0, (long long)b0,
                          (long long)(b0 * w0), t->world);
        } else {
            t->o.batch = (int)(b0 * w0 / t->world);
            if (t->rank == 0)
                kiln_log(ctx, KILN_LOG_INFO,
                         "resuming a %lld-rank run on %d rank%s: "
                         "kiln_train_opts.batch = %lld -> %d (same global batch)",
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

static kiln_status save(trainer *t, double lr)
{
    kiln_adamw *full = NULL; /* --zero 1: the shards, gathered on rank 0 */
    if (t->zero) {
        kiln_status zs = dist_zero_gather(t->ctx, t->zero, &full);
        if (zs) return zs;
    }
    if (t->rank != 0) return tr_dist_after_save(t);
    json_t *st = tr_state_json(t, lr);
    if (!st) {
        kiln_adamw_free(full);
        return kiln_fail(t->ctx, KILN_ERR_NOMEM, "out of memory");
    }
    char *tokj = t->o.rows ? (t->o.tokenizer_json ? strdup(t->o.tokenizer_json) : NULL)
                           : file_join(kiln_data_dir(t->data), "tokenizer.json");
    ckpt_save_args a = {.run_dir = t->run_dir,
                        .step = t->step,
                        .model = t->model,
                        .opt = t->zero ? full : t->opt,
                        .state = st,
                        .tokenizer_json = tokj,
                        .keep_last = t->o.keep_last,
                        .base_model = t->base_model[0] ? t->base_model : NULL,
                        .sparsity_json = t->sparse ? t->sparse_mark : NULL};
    kiln_status s = ckpt_save(t->ctx, &a, t->last_ckpt, sizeof t->last_ckpt);
    kiln_adamw_free(full);
    free(tokj);
    json_decref(st);
    if (!s) tr_say(t, "saved checkpoint %s", t->last_ckpt);
    return s ? s : tr_dist_after_save(t);
}

/* ---- setup ----------------------------------------------------------- */

static kiln_status check_opts(kiln_ctx *ctx, const kiln_train_opts *o)
{
    if (!o->data && !o->rows)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.data (a data directory) or kiln_train_opts.rows "
                         "is required");
    if (o->rows && !o->config && !o->init_from && !o->resume)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.rows needs a model: kiln_train_opts.init_from or "
                         "kiln_train_opts.config");
    if (!o->out)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_train_opts.out (the run directory) is required");
    if (o->config && o->init_from)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "give either kiln_train_opts.config or kiln_train_opts.init_from, "
                         "not both");
    if (o->batch <= 0 || o->seq <= 0 || o->grad_accum <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.batch, kiln_train_opts.seq and "
                         "kiln_train_opts.grad_accum must be positive (got %d, %d, %d)",
                         o->batch, o->seq, o->grad_accum);
    if (!(o->lr > 0) || o->min_lr < 0 || o->warmup < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.lr must be positive and kiln_train_opts.min_lr, "
                         "kiln_train_opts.warmup >= 0 (got %g, %g, %lld)",
                         o->lr, o->min_lr, (long long)o->warmup);
    if (o->steps < 0 || (o->steps == 0 && !(o->epochs > 0)))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "give kiln_train_opts.steps > 0 or kiln_train_opts.epochs > 0 "
                         "(got %lld, %g)", (long long)o->steps, o->epochs);
    if (o->beta1 < 0 || o->beta1 >= 1 || o->beta2 < 0 || o->beta2 >= 1 ||
        !(o->eps > 0) || o->weight_decay < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.beta1 and kiln_train_opts.beta2 must be in "
                         "[0,1), kiln_train_opts.eps > 0, "
                         "kiln_train_opts.weight_decay >= 0 (got %g, %g, %g, %g)",
                         o->beta1, o->beta2, o->eps, o->weight_decay);
    if (o->eval_every < 0 || o->eval_steps < 0 || o->save_every < 0 ||
        o->keep_last < 0 || o->log_every <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.eval_every, kiln_train_opts.eval_steps, "
                         "kiln_train_opts.save_every, kiln_train_opts.keep_last "
                         "must be >= 0 and kiln_train_opts.log_every > 0");
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

/* A pruned model (DIR/sparsity.json, kiln prune): its zeros stay zero
 * (sparsity.c). */
static kiln_status sparse_setup(trainer *t, const char *dir)
{
    bool marked;
    kiln_status s = kiln_prune_mark_load(t->ctx, dir, &marked);
    if (s || !marked) return s;
    size_t zeros;
    if ((s = sparse_mask_build(t->ctx, t->model, &t->sparse, &zeros))) return s;
    int n = snprintf(t->sparse_mark, sizeof t->sparse_mark, "%s/sparsity.json", dir);
    if (n < 0 || (size_t)n >= sizeof t->sparse_mark)
        return kiln_fail(t->ctx, KILN_ERR_INVALID_ARG, "the path '%s' is too long", dir);
    tr_say(t, "sparse model (%s): its %zu zero weights in the pruned matrices stay zero",
           t->sparse_mark, zeros);
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
            cfg.vocab_size = t->data ? kiln_data_vocab_size(t->data) : cfg.vocab_size;
            from = "the default config";
        }
        if ((s = kiln_config_validate(ctx, &cfg))) return s;
        if ((s = kiln_model_new(ctx, &cfg, &t->model))) return s;
        kiln_model_init_random(t->model, o->seed);
    }
    if (o->init_from) snprintf(t->base_model, sizeof t->base_model, "%s", o->init_from);
    if (o->resume) { /* the base the run's adapters were made for */
        char *ap = file_join(o->resume, "adapter_config.json");
        json_t *aj = NULL;
        if (ap && file_exists(ap) && js_load_file(ctx, ap, &aj) == KILN_OK) {
            const char *b = json_string_value(json_object_get(aj, "base_model_name_or_path"));
            if (b) snprintf(t->base_model, sizeof t->base_model, "%s", b);
        }
        json_decref(aj);
        free(ap);
    }
    if (o->lora.rank > 0 && !o->resume) { /* LoRA: adapters over the weights */
        kiln_lora_opts lo = o->lora;
        if (!lo.seed) lo.seed = o->seed;
        if ((s = kiln_model_add_lora(ctx, &t->model, &lo))) return s;
    }
    const kiln_config *cfg = kiln_model_config(t->model);
    int dv = t->data ? kiln_data_vocab_size(t->data) : 0;
    if (cfg->vocab_size < dv)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "vocab size mismatch: the model (%s) has vocab_size "
                         "%d but the data in '%s' has vocab_size %d; use a "
                         "model config with vocab_size %d or tokenize the "
                         "data with the model's tokenizer",
                         from, cfg->vocab_size, o->data, dv, dv);
    if (o->seq > cfg->n_ctx)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.seq = %d exceeds the model's context length "
                         "(n_ctx %d in %s); use kiln_train_opts.seq = %d or less",
                         o->seq, cfg->n_ctx, from, cfg->n_ctx);
    if ((o->resume || o->init_from) && (s = sparse_setup(t, from))) return s;
    if ((s = tr_freeze(t))) return s;
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
    /* AUTO: decided (probed, logged) on rank 0 and sent to every rank, so
     * the ranks of one job never compute in different precisions (each
     * probing on its own could tip a close case either way) */
    t->prec_auto = o->precision == KILN_PRECISION_AUTO;
    if (t->prec_auto) {
        if (t->rank == 0) kiln_precision_auto(ctx, o->bf16_kernel, &t->auto_info);
        if (t->world > 1 &&
            (s = dist_bcast(ctx, t->dist, &t->auto_info, sizeof t->auto_info, 0)))
            return s;
        po.precision = t->auto_info.choice;
    }
    if ((s = kiln_model_set_precision_opts(ctx, t->model, &po))) return s;
    t->prec = kiln_model_precision(t->model);
    t->scaler = scaler_default(t->prec == KILN_PRECISION_FP16);
    /* opts.loss_scale: initial fp16 loss scale (tests force overflow with
     * a huge one; docs/precision.md). A checkpoint's scale wins on resume. */
    if (o->loss_scale > 0 && t->scaler.enabled) t->scaler.scale = o->loss_scale;
    t->step_scale = 1.0;
    s = kiln_model_prepare(ctx, t->model, o->batch, o->seq);
    if (s == KILN_ERR_RANGE || s == KILN_ERR_NOMEM) /* name the options */
        kiln_fail(ctx, s, "%s (B = kiln_train_opts.batch, T = kiln_train_opts.seq)",
                  kiln_errmsg(ctx));
    return s;
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
                         "kiln_train_opts.zero = %d is not supported; use 0 (off) or 1 "
                         "(shard the optimizer state)",
                         o->zero);
    if (o->resume && (s = tr_dist_resume_batch(t))) return s;
    snprintf(t->run_dir, sizeof t->run_dir, "%s", o->out);
    if (o->data && !realpath(o->data, t->data_real))
        snprintf(t->data_real, sizeof t->data_real, "%s", o->data);
    if (o->rows) { /* the second source: rows in memory (trainer_rows.c) */
    } else if ((s = kiln_data_open(ctx, o->data, &t->data))) {
        return s;
    } else if (kiln_data_tokens(t->data, KILN_SPLIT_TRAIN) == 0)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "'%s' has no training shards (train_files is empty)",
                         o->data);
    if (!o->rows && (s = kiln_loader_new(ctx, t->data, KILN_SPLIT_TRAIN, o->seq,
                                         o->shuffle, o->seed, &t->train))) {
        if (s == KILN_ERR_RANGE)
            kiln_fail(ctx, s, "%s (T = kiln_train_opts.seq)", kiln_errmsg(ctx));
        return s;
    }
    if (!o->resume) {
        char *lp = file_join(o->out, "latest");
        bool has = lp && file_exists(lp);
        free(lp);
        if (has)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "'%s' already holds checkpoints of a run; "
                             "continue it with kiln_train_opts.resume = %s, or "
                             "choose another kiln_train_opts.out",
                             o->out, o->out);
    }
    if ((s = make_model(t))) return s;
    if (o->rows && (s = tr_rows_setup(t))) return s;
    if ((s = tr_dist_bcast_params(t))) return s;
    t->G = (int64_t)o->batch * o->grad_accum * t->world;
    int64_t nwin = tr_num_windows(t);
    t->total = o->steps > 0 ? o->steps
                            : (int64_t)ceil(o->epochs * (double)nwin / (double)t->G);
    if (t->total < 1) t->total = 1;
    t->history = json_array();
    kiln_rng_seed(&t->rng, o->seed);
    t->val_loss = NAN;
    if (o->resume && (s = tr_load_state(t, o->resume))) return s;
    /* validation tokens: enough for eval_steps batches of B windows */
    size_t nv = t->data ? kiln_data_tokens(t->data, KILN_SPLIT_VAL) : 0;
    if (o->eval_every > 0 && o->eval_steps > 0 && !o->rows) {
        if (nv < 2) {
            kiln_log(ctx, KILN_LOG_WARN,
                     "'%s' has no validation split: no val_loss will be "
                     "reported (tokenize with kiln_tokenize_opts.val_fraction > 0)",
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
    if (o->rows && tr_rows_packed(o->rows) &&
        !(t->positions = kiln_malloc(ctx, bt * sizeof *t->positions)))
        return KILN_ERR_NOMEM;
    if (t->obj->weigh && !(t->weights = kiln_malloc(ctx, bt * sizeof *t->weights)))
        return KILN_ERR_NOMEM;
    if (o->rows) {
        size_t nb = (size_t)o->batch * (size_t)(t->obj->weigh ? o->grad_accum : 1);
        if (!(t->row_ids = kiln_malloc(ctx, nb * sizeof *t->row_ids))) return KILN_ERR_NOMEM;
    }
    if (t->obj->n_stats > 0) {
        if (t->obj->n_metrics < 1 || !t->obj->metric_names || !t->obj->stats_take ||
            !t->obj->metrics)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "objective '%s' has n_stats = %d but no n_metrics, "
                             "metric_names, stats_take or metrics",
                             t->obj->name, t->obj->n_stats);
        t->stat_sums = kiln_malloc(ctx, (size_t)t->obj->n_stats * sizeof *t->stat_sums);
        t->stat_vals = kiln_malloc(ctx, (size_t)t->obj->n_metrics * sizeof *t->stat_vals);
        t->val_stat_vals = kiln_malloc(ctx, (size_t)t->obj->n_metrics * sizeof *t->val_stat_vals);
        if (!t->stat_sums || !t->stat_vals || !t->val_stat_vals) return KILN_ERR_NOMEM;
        t->obj->stats_take(t->obj->user, false, t->stat_sums); /* start from zero */
        t->obj->stats_take(t->obj->user, true, t->stat_sums);
    }
    if (t->rank == 0 && (s = file_mkdirs(ctx, o->out))) return s;
    return tr_metrics_open(t);
}

/* ---- the loop -------------------------------------------------------- */

kiln_status tr_obj_stats(trainer *t, bool eval, double *vals)
{
    const kiln_objective *obj = t->obj;
    if (obj->n_stats <= 0) return KILN_OK;
    obj->stats_take(obj->user, eval, t->stat_sums);
    kiln_status s = tr_dist_sum(t, t->stat_sums, obj->n_stats);
    if (s) return s;
    obj->metrics(obj->user, t->stat_sums, vals);
    return KILN_OK;
}

/* The objective's metrics into a metrics object, prefixed. */
static void put_obj_stats(trainer *t, json_t *m, const char *prefix, const double *vals)
{
    for (int i = 0; i < t->obj->n_metrics; i++) {
        char key[128];
        snprintf(key, sizeof key, "%s%s", prefix, t->obj->metric_names[i]);
        json_object_set_new(m, key, isfinite(vals[i]) ? json_real(vals[i]) : json_null());
    }
}

/* The validation line: perplexity for cross-entropy, else the
 * objective's metrics. */
static void say_val(trainer *t)
{
    if (t->val_stat_have) {
        char st[512];
        tr_fmt_stats(t, "val_", t->val_stat_vals, st, sizeof st);
        tr_say(t, "step %lld: val_loss %.4f%s", (long long)t->step, t->val_loss, st);
    } else {
        tr_say(t, "step %lld: val_loss %.4f (perplexity %.2f)", (long long)t->step, t->val_loss,
               exp(t->val_loss));
    }
}

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
    if (t->o.rows)
        s = tr_rows_eval(t, sums);
    else if (end > start)
        s = kiln_eval_tokens(t->ctx, t->model, t->val + start, end - start,
                             t->o.batch, t->o.seq, &sums[0], &sums[1]);
    if (s) return s;
    if ((s = tr_dist_sum(t, sums, 2))) return s;
    *out = sums[1] > 0 ? sums[0] / sums[1] : NAN;
    if (t->o.rows && t->obj->n_stats > 0) {
        if ((s = tr_obj_stats(t, true, t->val_stat_vals))) return s;
        t->val_stat_have = true;
    }
    return KILN_OK;
}

static kiln_status diverged(trainer *t, const char *what, double v, double lr)
{
    return kiln_fail(t->ctx, KILN_ERR_NUMERIC,
                     "%s is %g at step %lld (lr %.3g): training diverged; "
                     "lower kiln_train_opts.lr, raise kiln_train_opts.warmup or use "
                     "kiln_train_opts.grad_clip, and "
                     "restart%s%s",
                     what, v, (long long)t->step + 1, lr,
                     t->last_ckpt[0] ? " or resume from " : "",
                     t->last_ckpt[0] ? t->last_ckpt : "");
}

/* Draws micro-step k's B windows of this process into in, tg (B, T). */
static void draw_micro(trainer *t, int k, int32_t *in, int32_t *tg, int32_t *ps)
{
    const int B = t->o.batch, T = t->o.seq;
    int64_t row0 = t->pos + ((int64_t)k * t->world + t->rank) * B;
    int64_t *ids = t->row_ids ? t->row_ids + (t->obj->weigh ? (size_t)k * (size_t)B : 0) : NULL;
    for (int b = 0; b < B; b++) {
        if (t->o.rows)
            tr_rows_get(t, row0 + b, in + (size_t)b * T, tg + (size_t)b * T,
                        ps ? ps + (size_t)b * T : NULL, &ids[b]);
        else kiln_loader_get(t->train, row0 + b, in + (size_t)b * T, tg + (size_t)b * T);
    }
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
        .rows = t->row_ids ? t->row_ids + (t->obj->weigh ? (size_t)k * (size_t)t->o.batch : 0)
                           : NULL,
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
        draw_micro(t, k, t->inputs + (size_t)k * bt, t->targets + (size_t)k * bt,
                   t->positions ? t->positions + (size_t)k * bt : NULL);
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
        if (!obj->weigh) draw_micro(t, k, t->inputs, t->targets, t->positions);
        float *logits;
        const int32_t *ps = NULL; /* packed rows: this micro-batch's positions */
        if (t->positions) ps = t->positions + (obj->weigh ? (size_t)k * B * T : 0);
        /* LoRA dropout masks of (seed, step, micro-batch): a resumed run's */
        kiln_model_lora_train(t->model, true,
                              o->seed * 0x9e3779b97f4a7c15ull + (uint64_t)t->step * K + k);
        s = kiln_model_forward_pos(ctx, t->model, mb.tokens, ps, B, T, &logits);
        if (s) {
            kiln_model_lora_train(t->model, false, 0);
            return s;
        }
        if (k == K - 1 && !t->zero && (s = tr_dist_grads_begin(t))) return s;
        if (k == K - 1 && !t->zero && t->world > 1) /* frozen buckets: no allreduce */
            dist_grads_skip(t->dist, t->fz_off, t->fz_len, t->nfz);
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
        kiln_model_lora_train(t->model, false, 0); /* evaluation runs without dropout */
        if (s) return s;
    }
    model_grads_materialize(t->model);
    float *g = model_grads_deferred(t->model);
    size_t n = kiln_model_num_params(t->model);
    /* --zero 1: each rank receives the mean gradient of its shard only */
    if ((s = t->zero ? dist_zero_reduce_grads(ctx, t->zero, g)
                     : tr_dist_grads_finish(t)))
        return s;
    if (t->sparse) sparse_mask_apply(t->model, t->sparse, g); /* zeros stay zero */
    if ((s = tr_dist_sum(t, sums, 2))) return s;
    *loss = sums[0] / sums[1];
    t->step_weight = sums[1];
    if (obj->n_stats > 0) {
        if ((s = tr_obj_stats(t, false, t->stat_vals))) return s;
        t->stat_have = true;
    }
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
            tr_say(t, "step %lld: skipped: inf/NaN gradient at loss scale %g; loss scale now %g",
                (long long)t->step + 1, t->step_scale, t->scaler.scale);
            if (t->rank == 0 && scaler_warn_low(&t->scaler, &t->scale_warned))
                kiln_log(ctx, KILN_LOG_WARN,
                         "step %lld: the fp16 loss scale fell to %g, below 1: the gradients "
                         "overflow fp16 even unscaled, so the model is most likely diverging "
                         "(%lld steps skipped so far); lower kiln_train_opts.lr (now %g) or "
                         "train in bf16 or fp32 (kiln_train_opts.precision)",
                         (long long)t->step + 1, t->scaler.scale,
                         (long long)t->scaler.skipped_steps, *lr);
            t->pos += t->G;
            t->step++;
            return KILN_OK;
        }
    }
    if (!isfinite(*gnorm)) return diverged(t, "the gradient norm", *gnorm, *lr);
    grad_mul *= kiln_clip_grad_coef(*gnorm, o->grad_clip);
    if (t->zero) {
        if ((s = dist_zero_update_scaled(ctx, t->zero, model_params_write(t->model),
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
    free(t->positions);
    free(t->weights);
    free(t->val);
    free(t->row_perm);
    free(t->row_ids);
    free(t->stat_sums);
    free(t->stat_vals);
    free(t->val_stat_vals);
    free(t->sparse);
    kiln_loader_free(t->train);
    kiln_data_close(t->data);
    kiln_adamw_free(t->opt);
    kiln_model_free(t->model);
    json_decref(t->ckpt_opts);
    free(t->freeze_buf);
    free(t->fz_off);
    free(t->fz_len);
    tr_dist_free(t, s);
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
    tr_banner(t);
    if (t->o.resume) snprintf(t->last_ckpt, sizeof t->last_ckpt, "%s", t->o.resume);
    double loss = NAN, lr = 0, gnorm = 0;
    bool stopped = false;
    if (t->step == 0 && (t->val || t->row_val) && !opts->resume) {
        if ((s = evaluate(t, &t->val_loss))) goto out;
        say_val(t);
        json_t *m = json_pack("{s:I,s:f}", "step", (json_int_t)0, "val_loss",
                              t->val_loss);
        if (t->val_stat_have) put_obj_stats(t, m, "val_", t->val_stat_vals);
        if (t->rank == 0) tr_metrics_append(t, m);
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
            (double)t->pos / (double)tr_num_windows(t),
            "tokens", (json_int_t)(t->pos * t->o.seq));
        /* communication: seconds this rank waited on other ranks */
        json_object_set_new(m, "world_size", json_integer(t->world));
        /* with rows: what the loss averages over: the step's tokens with a
         * target (masked CE), else the objective's weight (DPO: pairs) */
        if (t->o.rows)
            json_object_set_new(m, t->obj->fused_ce ? "loss_tokens" : "loss_weight",
                                json_integer((json_int_t)t->step_weight));
        json_object_set_new(m, "comm_s", json_real(comm.wait_s));
        json_object_set_new(m, "comm_frac", json_real(dt > 0 ? comm.wait_s / dt : 0));
        if (!isfinite(gnorm)) /* a skipped fp16 step: JSON has no inf/NaN */
            json_object_set_new(m, "grad_norm", json_null());
        if (t->scaler.enabled) {
            json_object_set_new(m, "loss_scale", json_real(t->step_scale));
            json_object_set_new(m, "skipped", json_boolean(t->step_skipped));
        }
        if (t->stat_have) put_obj_stats(t, m, "", t->stat_vals);
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
        if ((t->val || t->row_val) && ((t->o.eval_every > 0 && t->step % t->o.eval_every == 0) || last)) {
            if ((s = evaluate(t, &t->val_loss))) {
                json_decref(m);
                goto out;
            }
            json_object_set_new(m, "val_loss", json_real(t->val_loss));
            if (t->val_stat_have) put_obj_stats(t, m, "val_", t->val_stat_vals);
            say_val(t);
        }
        if (t->rank == 0) tr_metrics_append(t, m);
        json_decref(m);
        tr_progress(t, loss, lr, gnorm, tps);
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
