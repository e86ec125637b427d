/*
 * cli_tune.c — the training flags that the fine-tuning commands (kiln sft,
 * kiln dpo) share: their table entries, their checks, and how --resume
 * takes a checkpoint's options with the flags given on top. Each command
 * adds its own data and objective flags around them (cli.h, "cli_tune").
 */
#include "cli.h"

#include <errno.h>
#include <jansson.h>
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
    t->lora_alpha = 8; /* PEFT's */
    cli_train_flags_init(&t->f, &t->o);
}

/* kiln train's help texts where fine-tuning's defaults or meaning differ. */
static const char *tune_help(const char *name)
{
    static const struct {
        const char *name, *help;
    } h[] = {
        {"lr", "peak learning rate [2e-5]"},
        {"min-lr", "final learning rate of cosine/linear decay [0]"},
        {"warmup", "linear warmup steps [0]"},
        {"epochs", "passes over the training examples [1]"},
        {"weight-decay", "AdamW decoupled weight decay on matrices [0]"},
        {"sequential", "visit examples in file order instead of a seeded shuffle per epoch"},
        {"eval-every", "steps between validation evals, 0 = off [50]"},
        {"save-every", "steps between checkpoints, 0 = at the end only [0]"},
        {"keep-last", "checkpoints to keep, 0 = all [1]"},
        {"seed", "seed of the split and the data order [1337]"},
    };
    for (size_t i = 0; i < sizeof h / sizeof *h; i++)
        if (!strcmp(h[i].name, name)) return h[i].help;
    return NULL;
}

int cli_tune_flags(cli_tune *t, cli_opt *opts, const char *batch_help)
{
    cli_opt common[CLI_TRAIN_COMMON_OPTS];
    int nc = cli_train_common_opts(common, &t->o, &t->f), n = 0;
    opts[n++] = (cli_opt){"out", CLI_STR, &t->o.out, "run directory (checkpoints, metrics.jsonl)", false};
    opts[n++] = (cli_opt){"resume", CLI_OPTSTR, &t->resume, "continue a run: a run directory or a step_* checkpoint [--out]", false};
    for (int i = 0; i < nc; i++) {
        if (!strcmp(common[i].name, "seq")) continue;
        opts[n] = common[i];
        if (!strcmp(common[i].name, "batch")) opts[n].help = batch_help;
        else if (tune_help(common[i].name)) opts[n].help = tune_help(common[i].name);
        n++;
    }
    opts[n++] = (cli_opt){"lora-rank", CLI_INT, &t->o.lora.rank, "LoRA: train rank-R adapters (PEFT's formula, fp32) on a frozen base instead of every weight; 0 = full fine-tuning [0]", false};
    opts[n++] = (cli_opt){"lora-alpha", CLI_F64, &t->lora_alpha, "LoRA: alpha, the adapters' scale is alpha/R [8, PEFT's]", false};
    opts[n++] = (cli_opt){"lora-dropout", CLI_F64, &t->lora_dropout, "LoRA: dropout on the adapters' input while training [0]", false};
    opts[n++] = (cli_opt){"lora-targets", CLI_STR, &t->lora_targets, "LoRA: modules to adapt, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; gpt2 c_attn,c_proj,c_fc) or all-linear [PEFT's default: q_proj,v_proj; gpt2 c_attn]", false};
    return n;
}

bool cli_tune_check(const char *cmd, cli_tune *t, int argc, char **argv)
{
    return cli_train_flags_apply(cmd, argc, argv, &t->f, &t->o);
}

int cli_tune_lora(kiln_ctx *ctx, const char *cmd, const cli_tune *t, int argc, char **argv,
                  const kiln_config *cfg, kiln_train_opts *o)
{
    bool any = cli_given(argc, argv, "lora-alpha") || cli_given(argc, argv, "lora-dropout") ||
               cli_given(argc, argv, "lora-targets");
    if (o->lora.rank <= 0) {
        if (any || cli_given(argc, argv, "lora-rank")) {
            fprintf(stderr, "kiln %s: --lora-alpha, --lora-dropout and --lora-targets need "
                            "--lora-rank R (R >= 1)\n", cmd);
            return 2;
        }
        return 0;
    }
    if (cfg->lora_rank > 0) {
        fprintf(stderr, "kiln %s: --model has LoRA adapters already (a LoRA run's "
                        "checkpoint): merge them first (kiln merge) or continue that run with "
                        "--resume\n", cmd);
        return 2;
    }
    const char *tg = t->lora_targets ? t->lora_targets
                     : cfg->arch == KILN_ARCH_GPT2 ? "c_attn" : "q_proj,v_proj";
    unsigned mask;
    if (kiln_lora_parse_targets(ctx, cfg->arch, tg, "--lora-targets", &mask)) {
        fprintf(stderr, "kiln %s: %s\n", cmd, kiln_errmsg(ctx));
        return 2;
    }
    o->lora.alpha = (float)t->lora_alpha;
    o->lora.dropout = (float)t->lora_dropout;
    o->lora.targets = mask;
    kiln_config lc = *cfg;
    lc.lora_rank = o->lora.rank;
    lc.lora_alpha = o->lora.alpha;
    lc.lora_dropout = o->lora.dropout;
    lc.lora_targets = mask;
    if (kiln_config_validate(ctx, &lc)) {
        fprintf(stderr, "kiln %s: --lora-rank/--lora-alpha/--lora-dropout: %s\n", cmd,
                kiln_errmsg(ctx));
        return 2;
    }
    size_t all = kiln_config_num_params(&lc), base = kiln_config_num_params(cfg);
    printf("lora: r %d, alpha %g, dropout %g, targets %s: %zu trainable of %zu parameters "
           "(%.3f%%)\n", o->lora.rank, t->lora_alpha, t->lora_dropout, tg, all - base, all,
           100.0 * (double)(all - base) / (double)all);
    return 0;
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

int cli_save_run_json(const char *cmd, const char *out, const char *name, json_t *j)
{
    char path[4200], tmp[4300];
    snprintf(path, sizeof path, "%s/%s", out, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int rc = j ? json_dump_file(j, tmp, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : -1;
    if (!rc && rename(tmp, path) != 0) rc = -1;
    json_decref(j);
    if (rc) fprintf(stderr, "kiln %s: cannot write %s\n", cmd, path);
    return rc ? 1 : 0;
}

json_t *cli_load_run_json(const char *cmd, const char *run, const char *name)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", run, name);
    json_error_t err;
    json_t *j = json_load_file(path, 0, &err);
    if (!j)
        fprintf(stderr, "kiln %s: --resume: cannot read %s (%s, line %d): a kiln %s run "
                        "directory has it\n", cmd, path, err.text, err.line, cmd);
    return j;
}
