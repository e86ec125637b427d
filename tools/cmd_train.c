/*
 * cmd_train.c — `kiln train` (pretraining with checkpoints and exact
 * resume) and `kiln plot` (a run's loss curves as SVG).
 */
#include "cli.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile int g_stop; /* set on SIGINT, SIGTERM or SIGUSR1 */

/* The stop signals are blocked in every thread of kiln train (the threads
 * that OpenMP, MPI and oneDNN start later inherit the mask) and taken
 * synchronously by one thread of its own: no handler ever runs on a
 * compute thread's stack or interrupts a system call there. (With an
 * asynchronous handler, about 1 run in 15 of tests/t_dist_train.sh lost a
 * rank stopped by SIGTERM or SIGUSR1 to heap corruption detected inside
 * oneDNN's sgemm.) */
static sigset_t g_stop_sigs;

static void *stop_signal_thread(void *arg)
{
    (void)arg;
    for (;;) {
        int sig;
        if (sigwait(&g_stop_sigs, &sig) != 0) continue;
        if (g_stop) _exit(130); /* second signal: leave now */
        g_stop = 1;
        static const char msg[] =
            "\nkiln train: stopping after this step and saving a checkpoint "
            "(signal again to quit without saving)\n";
        ssize_t r = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void)r;
    }
    return NULL;
}

/* True when --name was given on the command line. */
bool cli_given(int argc, char **argv, const char *name)
{
    size_t n = strlen(name);
    for (int i = 1; i < argc; i++)
        if (!strncmp(argv[i], "--", 2) && !strncmp(argv[i] + 2, name, n) &&
            (argv[i][2 + n] == 0 || argv[i][2 + n] == '='))
            return true;
    return false;
}

/* ---- settings from the environment ----------------------------------
 * Older scripts steer kiln train through environment variables; the
 * library reads none of them (its settings are fields of
 * kiln_train_opts), so they are mapped here, each onto its field. A flag
 * given on the command line wins over its variable. Under mpirun, pass the
 * variables to the ranks with -x NAME. */

/* A positive number no larger than 1e9, from flag or variable `what`. */
static bool pos_number(const char *cmd, const char *what, const char *s, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (!*s || *end || !(v > 0) || v > 1e9) {
        fprintf(stderr, "kiln %s: %s='%s' is not a positive number; set it to e.g. 300 "
                        "or leave it out\n",
                cmd, what, s);
        return false;
    }
    *out = v;
    return true;
}

/* Applies the flags given, else the environment variables set, to *o.
 * Returns false after printing what is wrong. */
bool cli_train_settings(const char *cmd, int argc, char **argv, const cli_env_flags *f,
                        kiln_train_opts *o)
{
    const char *e;
    const char *bk = cli_given(argc, argv, "bf16-kernel") ? f->bf16_kernel : getenv("KILN_BF16_KERNEL");
    if (bk && *bk) {
        int k = kiln_bf16_kernel_parse(bk);
        if (k < 0) {
            fprintf(stderr, "kiln %s: %s '%s' is not one of auto, ref, avx512, amx\n", cmd,
                    cli_given(argc, argv, "bf16-kernel") ? "--bf16-kernel" : "KILN_BF16_KERNEL", bk);
            return false;
        }
        o->bf16_kernel = (kiln_bf16_kernel)k;
    }
    if (cli_given(argc, argv, "fp32-acts")) o->bf16_acts = !f->fp32_acts;
    else if ((e = getenv("KILN_BF16_ACTS")) && !strcmp(e, "0")) o->bf16_acts = false;
    const char *ok = cli_given(argc, argv, "optim-kernel") ? f->optim_kernel : getenv("KILN_OPTIM_KERNEL");
    if (ok && *ok) {
        int k = kiln_optim_kernel_parse(ok);
        if (k < 0) {
            fprintf(stderr, "kiln %s: %s '%s' is not one of auto, portable\n", cmd,
                    cli_given(argc, argv, "optim-kernel") ? "--optim-kernel" : "KILN_OPTIM_KERNEL", ok);
            return false;
        }
        o->optim_kernel = (kiln_optim_kernel)k;
    }
    if (cli_given(argc, argv, "loss-scale")) {
        if (!(f->loss_scale > 0) || f->loss_scale > 1e30) {
            fprintf(stderr, "kiln %s: --loss-scale must be a positive number\n", cmd);
            return false;
        }
        o->loss_scale = f->loss_scale;
    } else if ((e = getenv("KILN_LOSS_SCALE")) && *e) {
        char *end;
        double v = strtod(e, &end);
        if (*end || !(v > 0) || v > 1e30) {
            fprintf(stderr, "kiln %s: KILN_LOSS_SCALE='%s' is not a positive number\n", cmd, e);
            return false;
        }
        o->loss_scale = v;
    }
    if (cli_given(argc, argv, "dist-timeout")) {
        if (!(f->dist_timeout > 0 && f->dist_timeout <= 1e9)) {
            fprintf(stderr, "kiln %s: --dist-timeout must be a positive number of seconds\n", cmd);
            return false;
        }
        o->dist.timeout_s = f->dist_timeout;
    } else if ((e = getenv("KILN_DIST_TIMEOUT")) && *e &&
             !pos_number(cmd, "KILN_DIST_TIMEOUT", e, &o->dist.timeout_s))
        return false;
    if (cli_given(argc, argv, "dist-bucket-mb")) {
        if (!(f->dist_bucket_mb > 0 && f->dist_bucket_mb <= 1e9)) {
            fprintf(stderr, "kiln %s: --dist-bucket-mb must be a positive number\n", cmd);
            return false;
        }
        o->dist.bucket_mb = f->dist_bucket_mb;
    } else if ((e = getenv("KILN_DIST_BUCKET_MB")) && *e &&
             !pos_number(cmd, "KILN_DIST_BUCKET_MB", e, &o->dist.bucket_mb))
        return false;
    if (cli_given(argc, argv, "no-dist-overlap")) o->dist.overlap = !f->no_dist_overlap;
    else if ((e = getenv("KILN_DIST_OVERLAP")) && !strcmp(e, "0")) o->dist.overlap = false;
    if (cli_given(argc, argv, "no-dist-progress")) o->dist.progress_table = !f->no_dist_progress;
    else if ((e = getenv("KILN_DIST_PROGRESS")) && !strcmp(e, "0")) o->dist.progress_table = false;
    return true;
}

void cli_precision_probe(kiln_ctx *ctx, int argc, char **argv, const cli_env_flags *f)
{
    if (cli_given(argc, argv, "no-precision-probe") && f->no_precision_probe)
        kiln_set_precision_probe(ctx, false);
}

int cli_parse_progress(const char *s)
{
    if (!strcmp(s, "auto")) return KILN_PROGRESS_AUTO;
    if (!strcmp(s, "bar")) return KILN_PROGRESS_BAR;
    if (!strcmp(s, "lines")) return KILN_PROGRESS_LINES;
    if (!strcmp(s, "none")) return KILN_PROGRESS_NONE;
    return -1;
}

void cli_train_block_signals(void)
{
    sigemptyset(&g_stop_sigs);
    sigaddset(&g_stop_sigs, SIGINT);
    sigaddset(&g_stop_sigs, SIGTERM);
    sigaddset(&g_stop_sigs, SIGUSR1); /* mpirun forwards SIGUSR1 to the ranks */
    pthread_sigmask(SIG_BLOCK, &g_stop_sigs, NULL);
}

void cli_train_unblock_signals(void) { pthread_sigmask(SIG_UNBLOCK, &g_stop_sigs, NULL); }

kiln_status cli_train_run(kiln_ctx *ctx, kiln_train_opts *o, kiln_train_result *res)
{
    g_stop = 0;
    o->stop_flag = &g_stop;
    pthread_t sig_thread;
    bool sig_thread_ok = pthread_create(&sig_thread, NULL, stop_signal_thread, NULL) == 0;
    if (!sig_thread_ok) /* the signals keep their default action (terminate) */
        pthread_sigmask(SIG_UNBLOCK, &g_stop_sigs, NULL);
    kiln_status s = kiln_train(ctx, o, res);
    if (sig_thread_ok) {
        pthread_cancel(sig_thread); /* sigwait is a cancellation point */
        pthread_join(sig_thread, NULL);
        pthread_sigmask(SIG_UNBLOCK, &g_stop_sigs, NULL);
    }
    return s;
}

void cli_train_report(kiln_ctx *ctx, const char *cmd, const char *out,
                      const kiln_train_result *res)
{
    if (res->rank != 0) return; /* rank 0 reports for an MPI job */
    char svg[4200], ap[4200];
    snprintf(svg, sizeof svg, "%s/loss.svg", out);
    bool plotted = kiln_plot_metrics(ctx, out, svg) == KILN_OK;
    if (res->interrupted) {
        printf("stopped at step %lld; checkpoint %s\nresume with: kiln %s --resume %s\n",
               (long long)res->step, res->checkpoint, cmd, out);
    } else {
        printf("done: step %lld, loss %.4f", (long long)res->step, res->loss);
        if (res->val_loss == res->val_loss) printf(", val_loss %.4f", res->val_loss);
        printf("\ncheckpoint: %s\nmetrics:    %s/metrics.jsonl\n", res->checkpoint, out);
        snprintf(ap, sizeof ap, "%s/adapter_config.json", res->checkpoint);
        if (access(ap, F_OK) == 0)
            printf("adapter:    %s (PEFT directory; kiln merge --adapter, or --adapter on "
                   "generate/chat/eval)\n", res->checkpoint);
    }
    if (plotted) printf("loss plot:  %s\n", svg);
}

/* ---- the training flags that kiln train and kiln distill share ------- */

int cli_train_common_opts(cli_opt *dst, kiln_train_opts *o, cli_train_flags *f)
{
    const cli_opt opts[] = {
        {"batch", CLI_INT, &o->batch, "sequences per micro-batch [8]", false},
        {"seq", CLI_INT, &o->seq, "tokens per sequence [128]", false},
        {"grad-accum", CLI_INT, &o->grad_accum, "micro-batches per optimizer step [1]", false},
        {"lr", CLI_F64, &o->lr, "peak learning rate [3e-4]", false},
        {"min-lr", CLI_F64, &o->min_lr, "final learning rate of cosine/linear decay [3e-5]", false},
        {"warmup", CLI_I64, &o->warmup, "linear warmup steps [100]", false},
        {"schedule", CLI_STR, &f->schedule, "cosine | linear | constant [cosine]", false},
        {"steps", CLI_I64, &o->steps, "optimizer steps (overrides --epochs)", false},
        {"epochs", CLI_F64, &o->epochs, "passes over the training split [1]", false},
        {"weight-decay", CLI_F64, &o->weight_decay, "AdamW decoupled weight decay on matrices [0.1]", false},
        {"beta1", CLI_F64, &o->beta1, "AdamW beta1 [0.9]", false},
        {"beta2", CLI_F64, &o->beta2, "AdamW beta2 [0.95]", false},
        {"eps", CLI_F64, &o->eps, "AdamW epsilon [1e-8]", false},
        {"grad-clip", CLI_F64, &o->grad_clip, "max global gradient norm, 0 = off [1.0]", false},
        {"sequential", CLI_BOOL, &f->sequential, "read windows in file order instead of a seeded shuffle per epoch", false},
        {"eval-every", CLI_I64, &o->eval_every, "steps between validation evals, 0 = off [100]", false},
        {"eval-steps", CLI_I64, &o->eval_steps, "validation batches per eval [20]", false},
        {"save-every", CLI_I64, &o->save_every, "steps between checkpoints, 0 = at the end only [500]", false},
        {"keep-last", CLI_INT, &o->keep_last, "checkpoints to keep, 0 = all [3]", false},
        {"seed", CLI_I64, &f->seed, "seed of initialisation and data order [1337]", false},
        {"threads", CLI_INT, &o->threads, "compute threads, 0 = all cores [0]", false},
        {"log-every", CLI_I64, &o->log_every, "steps between progress lines when not on a terminal [10]", false},
        {"progress", CLI_STR, &f->progress, "auto | bar | lines | none [auto]", false},
        {"max-time", CLI_F64, &o->max_time, "stop, save and exit after this many seconds [off]", false},
        {"zero", CLI_INT, &o->zero, "under mpirun: 1 shards the optimizer state across ranks (ZeRO-1) [0]", false},
        {"precision", CLI_STR, &f->precision, "fp32 | bf16 | fp16 | auto: dtype of the matrix products (fp32 master weights and AdamW; fp16 with dynamic loss scaling); auto = bf16 where a short probe measures its products at least 1.2x faster than fp32 on this CPU (cached in ~/.cache/kiln), else fp32 [auto]", false},
        {"stop-at", CLI_I64, &o->stop_at, "stop, save and exit after this step (as an interruption would) [off]", false},
        {"bf16-kernel", CLI_STR, &f->ef.bf16_kernel, "auto | ref | avx512 | amx: kernel of bf16/fp16 products (env KILN_BF16_KERNEL) [auto]", false},
        {"no-precision-probe", CLI_BOOL, &f->ef.no_precision_probe, "precision auto: bf16 whenever the CPU has bf16 hardware, without measuring (env KILN_PRECISION_PROBE=0)", false},
        {"fp32-acts", CLI_BOOL, &f->ef.fp32_acts, "bf16: keep fp32 activations between the bf16 products, for comparison (env KILN_BF16_ACTS=0)", false},
        {"optim-kernel", CLI_STR, &f->ef.optim_kernel, "auto | portable: the AdamW loop (env KILN_OPTIM_KERNEL) [auto]", false},
        {"loss-scale", CLI_F64, &f->ef.loss_scale, "fp16: initial loss scale (env KILN_LOSS_SCALE) [65536]", false},
        {"dist-timeout", CLI_F64, &f->ef.dist_timeout, "under mpirun: seconds a collective may take before the job is aborted (env KILN_DIST_TIMEOUT) [300]", false},
        {"dist-bucket-mb", CLI_F64, &f->ef.dist_bucket_mb, "under mpirun: gradient bucket size in MB (env KILN_DIST_BUCKET_MB) [25]", false},
        {"no-dist-overlap", CLI_BOOL, &f->ef.no_dist_overlap, "under mpirun: reduce gradients after the backward, not during it (env KILN_DIST_OVERLAP=0)", false},
        {"no-dist-progress", CLI_BOOL, &f->ef.no_dist_progress, "under mpirun: no node-shared progress table for the watchdog (env KILN_DIST_PROGRESS=0)", false},
    };
    _Static_assert(sizeof opts / sizeof *opts == CLI_TRAIN_COMMON_OPTS,
                   "CLI_TRAIN_COMMON_OPTS (cli.h) counts these entries");
    int n = (int)(sizeof opts / sizeof *opts);
    memcpy(dst, opts, sizeof opts);
    return n;
}

void cli_train_flags_init(cli_train_flags *f, const kiln_train_opts *o)
{
    *f = (cli_train_flags){.schedule = "cosine", .progress = "auto", .precision = "auto",
                           .seed = (int64_t)o->seed};
}

bool cli_train_flags_apply(const char *cmd, int argc, char **argv, cli_train_flags *f,
                           kiln_train_opts *o)
{
    if (cli_given(argc, argv, "steps") && o->steps <= 0) {
        /* steps 0 means "use --epochs" internally; typed on the command
         * line it silently trained a whole epoch */
        fprintf(stderr, "kiln %s: --steps must be positive (leave it out to train for "
                        "--epochs)\n", cmd);
        return false;
    }
    o->seed = (uint64_t)f->seed;
    o->shuffle = !f->sequential;
    int k = kiln_schedule_parse(f->schedule), pk = cli_parse_progress(f->progress);
    int pp = kiln_precision_parse(f->precision);
    if (k < 0 || pk < 0 || pp < 0) {
        fprintf(stderr, "kiln %s: %s '%s' is not one of %s\n", cmd,
                k < 0 ? "--schedule" : pk < 0 ? "--progress" : "--precision",
                k < 0 ? f->schedule : pk < 0 ? f->progress : f->precision,
                k < 0 ? "cosine, linear, constant"
                      : pk < 0 ? "auto, bar, lines, none" : "fp32, bf16, fp16, auto");
        return false;
    }
    o->schedule = (kiln_schedule)k;
    o->progress = (kiln_progress)pk;
    o->precision = (kiln_precision)pp;
    return true;
}

void cli_train_resume_merge(int argc, char **argv, const kiln_train_opts *o,
                            kiln_train_opts *saved)
{
    /* flags given now override the saved run options */
#define OVR(flag, field) if (cli_given(argc, argv, flag)) saved->field = o->field
    OVR("data", data); OVR("batch", batch); OVR("seq", seq);
    OVR("grad-accum", grad_accum); OVR("lr", lr); OVR("min-lr", min_lr);
    OVR("warmup", warmup); OVR("schedule", schedule); OVR("weight-decay", weight_decay);
    OVR("beta1", beta1); OVR("beta2", beta2); OVR("eps", eps);
    OVR("grad-clip", grad_clip); OVR("sequential", shuffle);
    OVR("eval-every", eval_every); OVR("eval-steps", eval_steps);
    OVR("save-every", save_every); OVR("keep-last", keep_last); OVR("seed", seed);
    OVR("log-every", log_every); OVR("precision", precision);
#undef OVR
    if (cli_given(argc, argv, "steps")) saved->steps = o->steps;
    else if (cli_given(argc, argv, "epochs")) {
        saved->steps = 0;
        saved->epochs = o->epochs;
    }
    saved->threads = o->threads;
    saved->progress = o->progress;
    saved->max_time = o->max_time;
    saved->stop_at = o->stop_at;
    saved->zero = o->zero;
}

int cmd_train(int argc, char **argv)
{
    /* before any thread starts: see stop_signal_thread */
    cli_train_block_signals();
    kiln_train_opts o = kiln_train_opts_default();
    const char *resume = NULL, *objective = "ce";
    cli_list freeze = {0};
    cli_train_flags tf;
    cli_train_flags_init(&tf, &o);
    cli_opt opts[CLI_TRAIN_COMMON_OPTS + 8] = {
        {"config", CLI_STR, &o.config, "model config.json for a new model", false},
        {"init-from", CLI_STR, &o.init_from, "start from this model directory", false},
        {"data", CLI_STR, &o.data, "data directory from kiln tokenize", false},
        {"out", CLI_STR, &o.out, "run directory (checkpoints, metrics.jsonl)", false},
        {"resume", CLI_OPTSTR, &resume, "continue a run: a run directory (its latest checkpoint) or a step_* checkpoint [--out]", false},
        {"objective", CLI_STR, &objective, "ce | masked_ce: what the run minimizes; masked_ce is cross-entropy over the tokens that have a target, averaged over their count (SFT's loss; on token shards every token has one) [ce]", false},
        {"freeze", CLI_LIST, &freeze, "freeze the tensors matching PATTERN (a name, or a glob: '*.attn.*', 'transformer.h.0.*'; quote it): no gradient, no optimizer state, weights unchanged; repeatable. A resume takes the run's own", false}};
    cli_train_common_opts(opts + 7, &o, &tf); /* the rest stays zero: the end */
    int rc = cli_parse("train", "train --data DIR --out DIR [--config C.json | --init-from DIR] [flags]\n       kiln train --resume RUN_DIR [flags]",
                       "Pretrains a causal language model on token shards. Writes\n"
                       "RUN/metrics.jsonl, RUN/step_*/ checkpoints and RUN/loss.svg.\n"
                       "Ctrl-C (SIGINT), SIGTERM or SIGUSR1 finishes the step, saves and exits 0\n"
                       "(under mpirun: every rank, after the same step).\n"
                       "With --resume, the run's saved options are used; flags given\n"
                       "on the command line override them.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    int ret = 0;
    char ckpt[1024], databuf[4096], outbuf[1024];
    kiln_status s = KILN_OK;
    if (!cli_train_flags_apply("train", argc, argv, &tf, &o)) {
        ret = 2;
        goto done;
    }
    o.freeze = freeze.items;
    o.n_freeze = freeze.n;
    o.objective = kiln_objective_builtin(objective);
    if (!o.objective) {
        fprintf(stderr, "kiln train: --objective '%s' is not one of ce, masked_ce\n", objective);
        ret = 2;
        goto done;
    }
    if (resume) {
        const char *where = *resume ? resume : o.out;
        if (!where) {
            fprintf(stderr, "kiln train: --resume needs a directory (or --out RUN)\n");
            ret = 2;
            goto done;
        }
        if ((s = kiln_checkpoint_resolve(ctx, where, ckpt, sizeof ckpt))) {
            kiln_fail(ctx, s, "--resume: %s", kiln_errmsg(ctx));
            ret = cli_fail(ctx, "train", s);
            goto done;
        }
        /* a kiln sft run (RUN/sft.json rebuilds its rows from the JSONL):
         * kiln sft continues it, with the flags given here */
        char sftj[4200];
        snprintf(sftj, sizeof sftj, "%s", ckpt);
        char *cut = strrchr(sftj, '/');
        snprintf(cut ? cut + 1 : sftj, sizeof sftj - (size_t)(cut ? cut + 1 - sftj : 0),
                 "sft.json");
        if (access(sftj, R_OK) == 0 && cmd_sft) {
            fprintf(stderr, "kiln train: %s is a kiln sft run: continuing it as kiln sft "
                            "--resume\n", where);
            ret = cmd_sft(argc, argv);
            goto done;
        }
        /* a kiln dpo run (RUN/dpo.json, RUN/ref_logps.bin): the same */
        snprintf(cut ? cut + 1 : sftj, sizeof sftj - (size_t)(cut ? cut + 1 - sftj : 0),
                 "dpo.json");
        if (access(sftj, R_OK) == 0 && cmd_dpo) {
            fprintf(stderr, "kiln train: %s is a kiln dpo run: continuing it as kiln dpo "
                            "--resume\n", where);
            ret = cmd_dpo(argc, argv);
            goto done;
        }
        /* a kiln distill run (RUN/distill.json names its teacher): kiln
         * distill continues it */
        snprintf(cut ? cut + 1 : sftj, sizeof sftj - (size_t)(cut ? cut + 1 - sftj : 0),
                 "distill.json");
        if (access(sftj, R_OK) == 0 && cmd_distill) {
            fprintf(stderr, "kiln train: %s is a kiln distill run: continuing it as kiln "
                            "distill --resume\n", where);
            ret = cmd_distill(argc, argv);
            goto done;
        }
        kiln_train_opts saved = kiln_train_opts_default();
        if ((s = kiln_train_opts_load(ctx, ckpt, &saved, databuf, sizeof databuf))) {
            ret = cli_fail(ctx, "train", s);
            goto done;
        }
        cli_train_resume_merge(argc, argv, &o, &saved);
        if (cli_given(argc, argv, "objective")) saved.objective = o.objective;
        saved.freeze = o.freeze; /* none given: the checkpoint's (kiln_train) */
        saved.n_freeze = o.n_freeze;
        if (!o.out) { /* the run directory holding the checkpoint */
            snprintf(outbuf, sizeof outbuf, "%s", ckpt);
            char *sl = strrchr(outbuf, '/');
            if (sl) *sl = 0;
            else snprintf(outbuf, sizeof outbuf, ".");
            saved.out = outbuf;
        } else {
            saved.out = o.out;
        }
        saved.resume = ckpt;
        saved.config = saved.init_from = NULL;
        o = saved;
    } else if (!o.data || !o.out) {
        fprintf(stderr, "kiln train: --data and --out are required (or --resume RUN_DIR; see kiln train --help)\n");
        ret = 2;
        goto done;
    }
    if (!cli_train_settings("train", argc, argv, &tf.ef, &o)) {
        ret = 2;
        goto done;
    }
    cli_precision_probe(ctx, argc, argv, &tf.ef);
    kiln_train_result res;
    s = cli_train_run(ctx, &o, &res);
    if (s) {
        ret = cli_fail(ctx, "train", s);
        goto done;
    }
    cli_train_report(ctx, "train", o.out, &res);
done:
    pthread_sigmask(SIG_UNBLOCK, &g_stop_sigs, NULL);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return ret;
}

int cmd_plot(int argc, char **argv)
{
    const char *out = NULL, *metric = "loss", *val_metric = NULL;
    cli_opt opts[] = {
        {"out", CLI_STR, &out, "SVG file to write [RUN_DIR/loss.svg, RUN_DIR/METRIC.svg]", false},
        {"metric", CLI_STR, &metric, "the metrics.jsonl number drawn as a line with its moving average, e.g. reward_mean (kiln grpo) [loss]", false},
        {"val-metric", CLI_STR, &val_metric, "a second number drawn as points, e.g. eval_exact [val_loss with --metric loss, else none]", false},
        {NULL, 0, NULL, NULL, false}};
    cli_list pos;
    int rc = cli_parse("plot", "plot RUN_DIR [--metric KEY] [--val-metric KEY] [--out FILE.svg]",
                       "Renders RUN_DIR/metrics.jsonl (train and validation loss vs\n"
                       "step, or the numbers --metric and --val-metric name) as an SVG image.",
                       opts, argc, argv, &pos);
    if (rc) {
        cli_free(opts, &pos);
        return rc == 1 ? 0 : 2;
    }
    if (pos.n != 1) {
        fprintf(stderr, "kiln plot: give one run directory (see kiln plot --help)\n");
        cli_free(opts, &pos);
        return 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    const char *run = pos.items[0];
    char *def = malloc(strlen(run) + strlen(metric) + 16);
    if (!def) return 1;
    sprintf(def, "%s/%s.svg", run, metric);
    const char *svg = out ? out : def;
    if (!val_metric && !strcmp(metric, "loss")) val_metric = "val_loss";
    kiln_status s = kiln_plot_metric(ctx, run, metric, val_metric, svg);
    int ret = 0;
    if (s) ret = cli_fail(ctx, "plot", s);
    else printf("wrote %s\n", svg);
    free(def);
    kiln_ctx_free(ctx);
    cli_free(opts, &pos);
    return ret;
}
