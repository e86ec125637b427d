/*
 * cli_tune.c — the training flags that the fine-tuning commands (kiln sft,
 * kiln dpo) share: their table entries, their checks, and how --resume
 * takes a checkpoint's options with the flags given on top. Each command
 * adds its own data and objective flags around them (cli.h, "cli_tune").
 */
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

void cli_tune_defaults(cli_tune *t)
{
    memset(t, 0, sizeof *t);
    t->o = kiln_train_opts_default();
    t->o.lr = 2e-5;
    t->o.min_lr = 0;
    t->o.warmup = 0;
    t->o.weight_decay = 0;
    t->o.eval_every = 50;
    t->o.save_every = 0;
    t->o.keep_last = 1;
    t->schedule = "cosine";
    t->progress = "auto";
    t->precision = "auto";
    t->seed = (int64_t)t->o.seed;
}

int cli_tune_flags(cli_tune *t, cli_opt *opts, const char *batch_help)
{
    kiln_train_opts *o = &t->o;
    cli_env_flags *ef = &t->ef;
    const cli_opt v[] = {
        {"out", CLI_STR, &o->out, "run directory (checkpoints, metrics.jsonl)", false},
        {"resume", CLI_OPTSTR, &t->resume, "continue a run: a run directory or a step_* checkpoint [--out]", false},
        {"batch", CLI_INT, &o->batch, batch_help, false},
        {"grad-accum", CLI_INT, &o->grad_accum, "micro-batches per optimizer step [1]", false},
        {"lr", CLI_F64, &o->lr, "peak learning rate [2e-5]", false},
        {"min-lr", CLI_F64, &o->min_lr, "final learning rate of cosine/linear decay [0]", false},
        {"warmup", CLI_I64, &o->warmup, "linear warmup steps [0]", false},
        {"schedule", CLI_STR, &t->schedule, "cosine | linear | constant [cosine]", false},
        {"steps", CLI_I64, &o->steps, "optimizer steps (overrides --epochs)", false},
        {"epochs", CLI_F64, &o->epochs, "passes over the training examples [1]", false},
        {"weight-decay", CLI_F64, &o->weight_decay, "AdamW decoupled weight decay on matrices [0]", false},
        {"beta1", CLI_F64, &o->beta1, "AdamW beta1 [0.9]", false},
        {"beta2", CLI_F64, &o->beta2, "AdamW beta2 [0.95]", false},
        {"eps", CLI_F64, &o->eps, "AdamW epsilon [1e-8]", false},
        {"grad-clip", CLI_F64, &o->grad_clip, "max global gradient norm, 0 = off [1.0]", false},
        {"sequential", CLI_BOOL, &t->sequential, "visit examples in file order instead of a seeded shuffle per epoch", false},
        {"eval-every", CLI_I64, &o->eval_every, "steps between validation evals, 0 = off [50]", false},
        {"eval-steps", CLI_I64, &o->eval_steps, "validation batches per eval [20]", false},
        {"save-every", CLI_I64, &o->save_every, "steps between checkpoints, 0 = at the end only [0]", false},
        {"keep-last", CLI_INT, &o->keep_last, "checkpoints to keep, 0 = all [1]", false},
        {"seed", CLI_I64, &t->seed, "seed of the split and the data order [1337]", false},
        {"threads", CLI_INT, &o->threads, "compute threads, 0 = all cores [0]", false},
        {"log-every", CLI_I64, &o->log_every, "steps between progress lines when not on a terminal [10]", false},
        {"progress", CLI_STR, &t->progress, "auto | bar | lines | none [auto]", false},
        {"max-time", CLI_F64, &o->max_time, "stop, save and exit after this many seconds [off]", false},
        {"stop-at", CLI_I64, &o->stop_at, "stop, save and exit after this step [off]", false},
        {"zero", CLI_INT, &o->zero, "under mpirun: 1 shards the optimizer state across ranks (ZeRO-1) [0]", false},
        {"precision", CLI_STR, &t->precision, "fp32 | bf16 | fp16 | auto: dtype of the matrix products [auto]", false},
        {"bf16-kernel", CLI_STR, &ef->bf16_kernel, "auto | ref | avx512 | amx (env KILN_BF16_KERNEL) [auto]", false},
        {"no-precision-probe", CLI_BOOL, &ef->no_precision_probe, "precision auto: bf16 whenever the CPU has bf16 hardware, without measuring (env KILN_PRECISION_PROBE=0)", false},
        {"fp32-acts", CLI_BOOL, &ef->fp32_acts, "bf16: keep fp32 activations (env KILN_BF16_ACTS=0)", false},
        {"optim-kernel", CLI_STR, &ef->optim_kernel, "auto | portable (env KILN_OPTIM_KERNEL) [auto]", false},
        {"loss-scale", CLI_F64, &ef->loss_scale, "fp16: initial loss scale (env KILN_LOSS_SCALE) [65536]", false},
        {"dist-timeout", CLI_F64, &ef->dist_timeout, "under mpirun: collective timeout in seconds (env KILN_DIST_TIMEOUT) [300]", false},
        {"dist-bucket-mb", CLI_F64, &ef->dist_bucket_mb, "under mpirun: gradient bucket MB (env KILN_DIST_BUCKET_MB) [25]", false},
        {"no-dist-overlap", CLI_BOOL, &ef->no_dist_overlap, "under mpirun: reduce gradients after the backward (env KILN_DIST_OVERLAP=0)", false},
        {"no-dist-progress", CLI_BOOL, &ef->no_dist_progress, "under mpirun: no progress table for the watchdog (env KILN_DIST_PROGRESS=0)", false},
    };
    int n = (int)(sizeof v / sizeof v[0]);
    memcpy(opts, v, sizeof v);
    return n;
}

bool cli_tune_check(const char *cmd, cli_tune *t, int argc, char **argv)
{
    kiln_train_opts *o = &t->o;
    if (cli_given(argc, argv, "steps") && o->steps <= 0) {
        fprintf(stderr, "kiln %s: --steps must be positive (leave it out to train for --epochs)\n",
                cmd);
        return false;
    }
    o->seed = (uint64_t)t->seed;
    o->shuffle = !t->sequential;
    int k = kiln_schedule_parse(t->schedule), pk = cli_parse_progress(t->progress);
    int pp = kiln_precision_parse(t->precision);
    if (k < 0 || pk < 0 || pp < 0) {
        fprintf(stderr, "kiln %s: %s '%s' is not one of %s\n", cmd,
                k < 0 ? "--schedule" : pk < 0 ? "--progress" : "--precision",
                k < 0 ? t->schedule : pk < 0 ? t->progress : t->precision,
                k < 0 ? "cosine, linear, constant"
                      : pk < 0 ? "auto, bar, lines, none" : "fp32, bf16, fp16, auto");
        return false;
    }
    o->schedule = (kiln_schedule)k;
    o->progress = (kiln_progress)pk;
    o->precision = (kiln_precision)pp;
    return true;
}

int cli_tune_resume(kiln_ctx *ctx, const char *cmd, cli_tune *t, int argc, char **argv,
                    char *ckpt, size_t ckpt_cap, char *databuf, size_t data_cap, char *run,
                    size_t run_cap)
{
    kiln_train_opts *o = &t->o;
    const char *where = *t->resume ? t->resume : o->out;
    if (!where) {
        fprintf(stderr, "kiln %s: --resume needs a directory (or --out RUN)\n", cmd);
        return 2;
    }
    kiln_status s;
    if ((s = kiln_checkpoint_resolve(ctx, where, ckpt, ckpt_cap))) {
        kiln_fail(ctx, s, "--resume: %s", kiln_errmsg(ctx));
        return cli_fail(ctx, cmd, s);
    }
    kiln_train_opts sv = kiln_train_opts_default();
    if ((s = kiln_train_opts_load(ctx, ckpt, &sv, databuf, data_cap))) return cli_fail(ctx, cmd, s);
#define OVR(flag, field) if (cli_given(argc, argv, flag)) sv.field = o->field
    OVR("batch", batch); OVR("grad-accum", grad_accum); OVR("lr", lr); OVR("min-lr", min_lr);
    OVR("warmup", warmup); OVR("schedule", schedule); OVR("weight-decay", weight_decay);
    OVR("beta1", beta1); OVR("beta2", beta2); OVR("eps", eps);
    OVR("grad-clip", grad_clip); OVR("sequential", shuffle);
    OVR("eval-every", eval_every); OVR("eval-steps", eval_steps);
    OVR("save-every", save_every); OVR("keep-last", keep_last);
    OVR("log-every", log_every); OVR("precision", precision);
#undef OVR
    if (cli_given(argc, argv, "steps")) sv.steps = o->steps;
    else if (cli_given(argc, argv, "epochs")) {
        sv.steps = 0;
        sv.epochs = o->epochs;
    }
    sv.threads = o->threads;
    sv.progress = o->progress;
    sv.max_time = o->max_time;
    sv.stop_at = o->stop_at;
    sv.zero = o->zero;
    snprintf(run, run_cap, "%s", ckpt);
    char *sl = strrchr(run, '/');
    if (sl) *sl = 0;
    else snprintf(run, run_cap, ".");
    sv.out = o->out ? o->out : run;
    sv.resume = ckpt;
    sv.config = sv.init_from = NULL;
    *o = sv;
    return 0;
}

/* The held-out examples: n_val of n chosen by a seeded shuffle, the rest
 * for training, each list in dataset order. */
void cli_split_indices(size_t n, size_t n_val, uint64_t seed, size_t *train, size_t *val)
{
    size_t *perm = malloc((n + 1) * sizeof *perm);
    unsigned char *is_val = calloc(n + 1, 1);
    kiln_rng r;
    kiln_rng_seed(&r, seed ^ 0x5f7d1e3c2b4a6987ULL);
    for (size_t i = 0; i < n; i++) perm[i] = i;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)kiln_rng_below(&r, (uint64_t)i);
        size_t x = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = x;
    }
    for (size_t i = 0; i < n_val; i++) is_val[perm[i]] = 1;
    size_t a = 0, b = 0;
    for (size_t i = 0; i < n; i++) {
        if (is_val[i]) val[b++] = i;
        else train[a++] = i;
    }
    free(perm);
    free(is_val);
}

/* A .gguf base: imported once into OUT/base (config.json, fp32
 * model.safetensors, tokenizer.json, and tokenizer_config.json with the
 * file's tokenizer.chat_template), the model directory the run then
 * starts from, records in sft.json and resumes with. */
kiln_status cli_import_gguf(kiln_ctx *ctx, const char *gguf, const char *out, char *base,
                               size_t cap)
{
    snprintf(base, cap, "%s/base", out);
    char p[4400];
    struct stat st;
    snprintf(p, sizeof p, "%s/config.json", base);
    if (stat(p, &st) == 0) return KILN_OK; /* imported by an earlier start */
    if (mkdir(out, 0777) != 0 && errno != EEXIST)
        return kiln_fail(ctx, KILN_ERR_IO, "cannot create '%s': %s", out, strerror(errno));
    kiln_model *m = NULL;
    kiln_tokenizer *tok = NULL;
    kiln_status s = kiln_model_load(ctx, gguf, &m);
    if (!s) s = kiln_tokenizer_load(ctx, gguf, &tok);
    if (!s) s = kiln_model_save(ctx, m, base);
    snprintf(p, sizeof p, "%s/tokenizer.json", base);
    if (!s) s = kiln_tokenizer_save(ctx, tok, p);
    if (!s) s = kiln_tokenizer_save_chat_config(ctx, tok, base);
    if (!s)
        printf("base: %s imported to %s (%s chat template)\n", gguf, base,
               kiln_tokenizer_chat_template(tok) ? "with its" : "no");
    kiln_tokenizer_free(tok);
    kiln_model_free(m);
    return s;
}

