/*
 * trainer_int.h — the trainer's state, shared by the loop (trainer.c) and
 * its run-directory and console side (trainer_io.c). Private to train/.
 */
#ifndef KILN_TRAINER_INT_H
#define KILN_TRAINER_INT_H

#include "model/model.h"
#include "train/dist.h"
#include "train/scaler.h"

#include <limits.h>
#include <stdio.h>

typedef struct trainer {
    kiln_ctx *ctx;
    kiln_train_opts o;
    char run_dir[1024];
    char data_real[PATH_MAX];
    char init_dir[1024]; /* --init-from resolved to a checkpoint */
    char base_model[1024]; /* a LoRA run's base, for adapter_config.json */
    kiln_model *model;
    kiln_adamw *opt;
    kiln_data *data;
    kiln_loader *train;
    int32_t *val;       /* (n_val) validation tokens */
    size_t n_val;
    const kiln_objective *obj; /* opts.objective, NULL resolved to CE */
    int32_t *inputs;    /* (B, T); (K, B, T) when obj->weigh */
    int32_t *targets;   /* (B, T); (K, B, T) when obj->weigh */
    int32_t *positions; /* as inputs, when the rows are packed (several
                           documents in a row: kiln_model_forward_pos) */
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
    double scale_warned;  /* scaler_warn_low's last warned scale (0: none) */
    bool prec_auto;       /* opts.precision was AUTO: auto_info says why */
    kiln_precision_auto_info auto_info;
    kiln_scaler scaler;   /* enabled for fp16 */
    double step_scale;    /* loss scale the last step ran with */
    bool step_skipped;    /* the last step was skipped (inf/NaN gradient) */
    /* the freeze patterns in effect (opts.freeze, or on resume without
     * them the checkpoint's, held by ckpt_opts) */
    const char *const *freeze;
    int n_freeze;
    json_t *ckpt_opts;    /* the resumed checkpoint's "options", or NULL */
    const char **freeze_buf;
    size_t *fz_off, *fz_len; /* the frozen tensors' ranges (nfz), sorted */
    int nfz;
    double step_weight;   /* the last step's loss weight (tokens with a target) */
    int64_t *row_perm;    /* (rows->rows) with opts.rows and shuffle */
    int64_t row_perm_epoch; /* epoch whose permutation is in row_perm; -1 none */
    bool row_val;         /* validate on opts.val_rows (given, evals on) */
    int row_group;        /* opts.row_group, at least 1 */
    int64_t *row_ids;     /* with rows: (B) or (K, B) when obj->weigh: each
                             batch row's index in rows (val_rows in evals) */
    double *stat_sums;    /* (obj->n_stats) the objective's summed stats */
    double *stat_vals;    /* (obj->n_metrics) its last training metrics */
    double *val_stat_vals;/* (obj->n_metrics) its last validation metrics */
    bool stat_have, val_stat_have;
    uint64_t *sparse;     /* a pruned model's zeros (sparsity.c), or NULL */
    char sparse_mark[1024]; /* its sparsity.json, copied into checkpoints */
} trainer;

/* ---- trainer_io.c ---------------------------------------------------- */

/* Prints a whole line on rank 0 (nothing with progress NONE), clearing a
 * drawn progress bar first. */
void tr_say(trainer *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The step's progress: the bar (redrawn at most 10 times a second) or a
 * plain line every log_every steps. */
void tr_progress(trainer *t, double loss, double lr, double gnorm, double tps);
/* The objective's metrics vals as " | PREFIXNAME VALUE" pieces into buf. */
void tr_fmt_stats(const trainer *t, const char *prefix, const double *vals, char *buf,
                  size_t cap);
/* The run's banner: model, data, batch, optimizer, precision. */
void tr_banner(trainer *t);
/* Applies opts.freeze to the model (on resume the checkpoint's patterns,
 * which opts.freeze must equal when given) and records the frozen ranges
 * (fz_off, fz_len) for the allreduce. Before the optimizer is made. */
kiln_status tr_freeze(trainer *t);
/* Appends a metrics object to the history and to RUN/metrics.jsonl. */
void tr_metrics_append(trainer *t, json_t *obj);
/* Rewrites RUN/metrics.jsonl from the history and opens it for appending
 * (rank 0). */
kiln_status tr_metrics_open(trainer *t);
/* trainer_state.json's object for the checkpoint of the current step (a
 * new reference; NULL when out of memory). */
json_t *tr_state_json(trainer *t, double lr);
/* Restores step, data position, rng, elapsed time, metrics history (cut
 * at the checkpoint's step) and, for fp16, the loss scaler from
 * DIR/trainer_state.json. */
kiln_status tr_load_state(trainer *t, const char *dir);

/* ---- trainer_rows.c: kiln_train_opts.rows, the second data source ------ */

/* Checks opts.rows/val_rows against the options and the model (T, one
 * document per row, token and target ids inside the vocabulary) and
 * allocates the row order. */
kiln_status tr_rows_setup(trainer *t);
/* Rows (or windows of the token stream) in one epoch. */
int64_t tr_num_windows(const trainer *t);
/* The row at global position pos (seeded shuffle of the row groups per
 * epoch, as the window loader's) into in, tg (T each), its positions into ps
 * (packed rows; NULL: not wanted); its index in rows to *id. */
void tr_rows_get(trainer *t, int64_t pos, int32_t *in, int32_t *tg, int32_t *ps, int64_t *id);
/* Whether rows hold several documents in a row (packed: their positions
 * go to the model). */
bool tr_rows_packed(const kiln_packed *p);
/* This rank's share of the validation rows (whole row groups): the masked
 * cross-entropy's sums (loss, tokens with a target), or with an objective
 * that is not fused_ce that objective's (loss sum, weight). */
kiln_status tr_rows_eval(trainer *t, double sums[2]);
/* The objective's metrics (kiln_objective.n_stats): takes its sums, adds
 * them over the processes and computes the values into vals. */
kiln_status tr_obj_stats(trainer *t, bool eval, double *vals);

#endif /* KILN_TRAINER_INT_H */
