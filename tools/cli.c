/*
 * cli.c — the long-flag parser shared by all subcommands.
 */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *kind_arg(cli_kind k)
{
    switch (k) {
    case CLI_STR: return " VALUE";
    case CLI_INT:
    case CLI_I64: return " N";
    case CLI_F64: return " X";
    case CLI_BOOL: return "";
    case CLI_LIST: return " A [B ...]";
    case CLI_OPTSTR: return " [VALUE]";
    }
    return "";
}

static void print_help(const char *cmd, const char *usage, const char *about,
                       const cli_opt *opts)
{
    printf("usage: kiln %s\n", usage);
    if (about && *about) printf("\n%s\n", about);
    printf("\noptions:\n");
    for (const cli_opt *o = opts; o->name; o++) {
        char left[96];
        snprintf(left, sizeof left, "--%s%s", o->name, kind_arg(o->kind));
        printf("  %-28s %s%s\n", left, o->help ? o->help : "",
               o->required ? " (required)" : "");
    }
    printf("  %-28s %s\n", "--help", "show this help");
    (void)cmd;
}

#define KILN_CLI_MAX_THREADS 1024
#define KILN_CLI_MAX_THREADS_STR "1024"

static int bad(const char *cmd, const char *flag, const char *val,
               const char *want)
{
    fprintf(stderr, "kiln %s: --%s: '%s' is not %s (see kiln %s --help)\n",
            cmd, flag, val, want, cmd);
    return 2;
}

static int set_value(const char *cmd, const cli_opt *o, const char *v)
{
    char *end;
    errno = 0;
    switch (o->kind) {
    case CLI_STR:
    case CLI_OPTSTR:
        *(const char **)o->dst = v;
        return 0;
    case CLI_INT: {
        long x = strtol(v, &end, 10);
        if (errno || *end || end == v || x < -2147483647L || x > 2147483647L)
            return bad(cmd, o->name, v, "an integer");
        /* every --threads flag sizes OpenMP teams and per-thread buffers:
         * an absurd count crashes the runtime, a negative one was silently
         * read as "all cores" */
        if (!strcmp(o->name, "threads") && (x < 0 || x > KILN_CLI_MAX_THREADS))
            return bad(cmd, o->name, v,
                       "0 (all cores) or a thread count from 1 to "
                       KILN_CLI_MAX_THREADS_STR);
        /* --ctx (generate, chat, serve): 0 is the model's context, a
         * negative one was silently read as 0 */
        if (!strcmp(o->name, "ctx") && x < 0)
            return bad(cmd, o->name, v, "0 (the model's context) or a positive length");
        *(int *)o->dst = (int)x;
        return 0;
    }
    case CLI_I64: {
        long long x = strtoll(v, &end, 10);
        if (errno || *end || end == v) return bad(cmd, o->name, v, "an integer");
        *(int64_t *)o->dst = x;
        return 0;
    }
    case CLI_F64: {
        double x = strtod(v, &end);
        if (errno || *end || end == v || !isfinite(x))
            return bad(cmd, o->name, v, "a finite number");
        *(double *)o->dst = x;
        return 0;
    }
    default: return 0;
    }
}

int cli_parse(const char *cmd, const char *usage, const char *about,
              cli_opt *opts, int argc, char **argv, cli_list *pos)
{
    if (pos) {
        pos->items = calloc((size_t)argc + 1, sizeof(char *));
        pos->n = 0;
    }
    for (cli_opt *o = opts; o->name; o++)
        if (o->kind == CLI_LIST) {
            cli_list *l = o->dst;
            l->items = calloc((size_t)argc + 1, sizeof(char *));
            l->n = 0;
        }
    bool *seen = calloc(64, sizeof(bool));
    int nopts = 0;
    while (opts[nopts].name) nopts++;
    bool *seen_big = nopts > 64 ? calloc((size_t)nopts, sizeof(bool)) : NULL;
    if (seen_big) { free(seen); seen = seen_big; }

    int rc = 0;
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            print_help(cmd, usage, about, opts);
            rc = 1;
            break;
        }
        if (strncmp(a, "--", 2) != 0 || a[2] == 0) {
            if (!pos) {
                fprintf(stderr,
                        "kiln %s: unexpected argument '%s' (see kiln %s --help)\n",
                        cmd, a, cmd);
                rc = 2;
                break;
            }
            pos->items[pos->n++] = a;
            continue;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        cli_opt *o = NULL;
        int idx = 0;
        for (cli_opt *p = opts; p->name; p++, idx++)
            if (strlen(p->name) == nlen && !strncmp(p->name, name, nlen)) {
                o = p;
                break;
            }
        if (!o) {
            fprintf(stderr, "kiln %s: unknown flag '--%.*s' (see kiln %s --help)\n",
                    cmd, (int)nlen, name, cmd);
            rc = 2;
            break;
        }
        seen[idx] = true;
        if (o->kind == CLI_BOOL) {
            if (eq) {
                if (!strcmp(eq + 1, "true") || !strcmp(eq + 1, "1")) *(bool *)o->dst = true;
                else if (!strcmp(eq + 1, "false") || !strcmp(eq + 1, "0")) *(bool *)o->dst = false;
                else { rc = bad(cmd, o->name, eq + 1, "true or false"); }
            } else {
                *(bool *)o->dst = true;
            }
            continue;
        }
        if (o->kind == CLI_LIST) {
            cli_list *l = o->dst;
            if (eq) l->items[l->n++] = eq + 1;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
                l->items[l->n++] = argv[++i];
            if (l->n == 0) {
                fprintf(stderr, "kiln %s: --%s needs at least one value\n", cmd, o->name);
                rc = 2;
            }
            continue;
        }
        if (o->kind == CLI_OPTSTR) {
            if (eq) rc = set_value(cmd, o, eq + 1);
            else if (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
                rc = set_value(cmd, o, argv[++i]);
            else *(const char **)o->dst = "";
            continue;
        }
        const char *v;
        if (eq) v = eq + 1;
        else if (i + 1 < argc) v = argv[++i];
        else {
            fprintf(stderr, "kiln %s: --%s needs a value (see kiln %s --help)\n",
                    cmd, o->name, cmd);
            rc = 2;
            break;
        }
        rc = set_value(cmd, o, v);
    }
    if (rc == 0) {
        int idx = 0;
        for (cli_opt *o = opts; o->name; o++, idx++)
            if (o->required && !seen[idx]) {
                fprintf(stderr, "kiln %s: --%s is required (see kiln %s --help)\n",
                        cmd, o->name, cmd);
                rc = 2;
                break;
            }
    }
    free(seen);
    return rc;
}

void cli_free(cli_opt *opts, cli_list *pos)
{
    for (cli_opt *o = opts; o->name; o++)
        if (o->kind == CLI_LIST) {
            cli_list *l = o->dst;
            free(l->items);
            l->items = NULL;
            l->n = 0;
        }
    if (pos) {
        free(pos->items);
        pos->items = NULL;
        pos->n = 0;
    }
}

/* ---- option fields -> flags ------------------------------------------
 * The library names an option by its field, STRUCT.FIELD (kiln.h,
 * kiln_fail); the kiln command shows its flag instead. One table for every
 * subcommand: a field missing here is printed as it is. Fields whose flag
 * means the opposite (shuffle / --sequential, bf16_acts / --fp32-acts) are
 * left out on purpose. */
static const struct {
    const char *field, *flag;
} flag_of[] = {
    /* kiln train */
    {"kiln_train_opts.config", "--config"},
    {"kiln_train_opts.init_from", "--init-from"},
    {"kiln_train_opts.data", "--data"},
    {"kiln_train_opts.out", "--out"},
    {"kiln_train_opts.resume", "--resume"},
    {"kiln_train_opts.batch", "--batch"},
    {"kiln_train_opts.seq", "--seq"},
    {"kiln_train_opts.grad_accum", "--grad-accum"},
    {"kiln_train_opts.lr", "--lr"},
    {"kiln_train_opts.min_lr", "--min-lr"},
    {"kiln_train_opts.warmup", "--warmup"},
    {"kiln_train_opts.schedule", "--schedule"},
    {"kiln_train_opts.steps", "--steps"},
    {"kiln_train_opts.epochs", "--epochs"},
    {"kiln_train_opts.weight_decay", "--weight-decay"},
    {"kiln_train_opts.beta1", "--beta1"},
    {"kiln_train_opts.beta2", "--beta2"},
    {"kiln_train_opts.eps", "--eps"},
    {"kiln_train_opts.grad_clip", "--grad-clip"},
    {"kiln_train_opts.eval_every", "--eval-every"},
    {"kiln_train_opts.eval_steps", "--eval-steps"},
    {"kiln_train_opts.save_every", "--save-every"},
    {"kiln_train_opts.keep_last", "--keep-last"},
    {"kiln_train_opts.seed", "--seed"},
    {"kiln_train_opts.threads", "--threads"},
    {"kiln_train_opts.log_every", "--log-every"},
    {"kiln_train_opts.progress", "--progress"},
    {"kiln_train_opts.max_time", "--max-time"},
    {"kiln_train_opts.stop_at", "--stop-at"},
    {"kiln_train_opts.zero", "--zero"},
    {"kiln_train_opts.freeze", "--freeze"},
    {"kiln_train_opts.precision", "--precision"},
    {"kiln_train_opts.objective", "--objective"},
    {"kiln_train_opts.bf16_kernel", "--bf16-kernel"},
    {"kiln_train_opts.loss_scale", "--loss-scale"},
    {"kiln_train_opts.optim_kernel", "--optim-kernel"},
    {"kiln_train_opts.dist.timeout_s", "--dist-timeout"},
    {"kiln_train_opts.dist.bucket_mb", "--dist-bucket-mb"},
    {"kiln_dist_opts.timeout_s", "--dist-timeout"},
    {"kiln_dist_opts.bucket_mb", "--dist-bucket-mb"},
    {"kiln_precision_opts.precision", "--precision"},
    {"kiln_kd_opts.loss", "--kd-loss"},
    {"kiln_kd_opts.temperature", "--temperature"},
    {"kiln_kd_opts.alpha", "--alpha"},
    {"kiln_kd_opts.beta", "--beta"},
    {"kiln_precision_opts.bf16_kernel", "--bf16-kernel"},
    {"kiln_adamw_opts.kernel", "--optim-kernel"},
    /* kiln tokenize (--dataset: kiln_dataset_opts) */
    {"kiln_tokenize_opts.tokenizer_spec", "--tokenizer"},
    {"kiln_tokenize_opts.inputs", "--input"},
    {"kiln_tokenize_opts.out_dir", "--out"},
    {"kiln_tokenize_opts.format", "--format"},
    {"kiln_tokenize_opts.field", "--field"},
    {"kiln_tokenize_opts.doc_separator", "--doc-separator"},
    {"kiln_tokenize_opts.val_fraction", "--val-fraction"},
    {"kiln_tokenize_opts.shard_tokens", "--shard-tokens"},
    {"kiln_tokenize_opts.threads", "--threads"},
    {"kiln_tokenize_opts.skip_bad", "--skip-bad"},
    {"kiln_dataset_opts.max_len", "--max-len"},
    {"kiln_dataset_opts.skip_bad", "--skip-bad"},
    /* kiln dpo */
    {"kiln_dpo_opts.beta", "--beta"},
    {"kiln_dpo_opts.loss", "--loss"},
    /* kiln tokenizer train */
    {"kiln_tokenizer_train_opts.inputs", "--input"},
    {"kiln_tokenizer_train_opts.field", "--field"},
    {"kiln_tokenizer_train_opts.vocab_size", "--vocab-size"},
    {"kiln_tokenizer_train_opts.specials", "--special"},
    {"kiln_tokenizer_train_opts.pattern", "--pattern"},
    {"kiln_tokenizer_train_opts.min_frequency", "--min-frequency"},
    {"kiln_tokenizer_train_opts.threads", "--threads"},
    {"kiln_tokenizer_train_opts.max_bytes", "--max-bytes"},
    /* kiln generate, chat */
    {"kiln_spec_opts.n_draft", "--draft-tokens"},
    {"kiln_sampling.temperature", "--temperature"},
    {"kiln_sampling.top_k", "--top-k"},
    {"kiln_sampling.top_p", "--top-p"},
    {"kiln_sampling.min_p", "--min-p"},
    {"kiln_sampling.repetition_penalty", "--repetition-penalty"},
    {"kiln_sampling.frequency_penalty", "--frequency-penalty"},
    {"kiln_sampling.presence_penalty", "--presence-penalty"},
    {"kiln_sampling.seed", "--seed"},
    {"kiln_gen_opts.max_tokens", "--max-tokens"},
    {"kiln_gen_opts.stops", "--stop"},
    {"kiln_gen_opts.stop_ids", "--stop-token"},
    {"kiln_gen_opts.ignore_eos", "--ignore-eos"},
    {"kiln_lora_opts.rank", "--lora-rank"},
    {"kiln_lora_opts.alpha", "--lora-alpha"},
    {"kiln_lora_opts.dropout", "--lora-dropout"},
    {"kiln_lora_opts.targets", "--lora-targets"},
    /* kiln grpo */
    {"kiln_grpo_opts.clip_low", "--clip"},
    {"kiln_grpo_opts.clip_high", "--clip-high"},
    {"kiln_grpo_opts.beta", "--beta"},
    {"kiln_grpo_opts.max_new_tokens", "--max-new-tokens"},
    {"kiln_reward_opts.spec", "--reward"},
    {"kiln_reward_opts.regex", "--regex"},
    {"kiln_reward_opts.tolerance", "--tolerance"},
    {"kiln_reward_opts.cmd_timeout", "--reward-timeout"},
    {"kiln_reward_opts.cmd", "--reward-cmd"},
    {"kiln_engine_opts.n_slots", "--parallel"},
    {"kiln_engine_opts.n_ctx", "--ctx"},
    {"kiln_engine_opts.wtype", "--dtype"},
    /* kiln serve */
    {"kiln_serve_opts.model_dir", "--model"},
    {"kiln_serve_opts.draft_dir", "--draft"},
    {"kiln_serve_opts.adapters", "--adapter"},
    {"kiln_serve_opts.n_adapters", "--adapter"},
    {"kiln_serve_opts.draft_tokens", "--draft-tokens"},
    {"kiln_serve_opts.model_name", "--name"},
    {"kiln_serve_opts.tokenizer", "--tokenizer"},
    {"kiln_serve_opts.host", "--host"},
    {"kiln_serve_opts.port", "--port"},
    {"kiln_serve_opts.api_key", "--api-key"},
    {"kiln_serve_opts.parallel", "--parallel"},
    {"kiln_serve_opts.n_ctx", "--ctx"},
    {"kiln_serve_opts.max_queue", "--max-queue"},
    {"kiln_serve_opts.max_body", "--max-body"},
    {"kiln_serve_opts.log_format", "--log-format"},
    {"kiln_serve_opts.cors", "--cors"},
    {"kiln_serve_opts.max_connections", "--max-connections"},
    {"kiln_serve_opts.wtype", "--dtype"},
    {"kiln_serve_opts.watch_ms", "--watch-ms"},
    {"kiln_serve_opts.run_dir", "--model"},
    /* kiln prune */
    {"kiln_prune_opts.method", "--method"},
    {"kiln_prune_opts.sparsity", "--sparsity"},
    {"kiln_prune_opts.score", "--score"},
    {"kiln_prune_opts.group", "--group"},
    {"kiln_prune_opts.calib", "--calib"},
    {"kiln_prune_opts.n_calib", "--calib-tokens"},
    {"kiln_prune_opts.batch", "--batch"},
    {"kiln_prune_opts.seq", "--seq"},
};

static bool ident_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_';
}

const char *cli_flag_of(const char *field, size_t len)
{
    for (size_t i = 0; i < sizeof flag_of / sizeof flag_of[0]; i++)
        if (strlen(flag_of[i].field) == len && !strncmp(flag_of[i].field, field, len))
            return flag_of[i].flag;
    return NULL;
}

const char *cli_flags(const char *msg, char *buf, size_t cap)
{
    size_t o = 0;
    if (!cap) return msg;
    for (const char *p = msg; *p && o + 1 < cap;) {
        if (!strncmp(p, "kiln_", 5) && (p == msg || !ident_char(p[-1]))) {
            /* the whole dotted name: kiln_x_opts.field or .sub.field */
            const char *e = p;
            while (ident_char(*e) || (*e == '.' && ident_char(e[1]))) e++;
            const char *flag = cli_flag_of(p, (size_t)(e - p));
            if (flag) {
                int n = snprintf(buf + o, cap - o, "%s", flag);
                if (n > 0) o = o + (size_t)n < cap - 1 ? o + (size_t)n : cap - 1;
                p = e;
                /* "FIELD = VALUE" reads "--flag VALUE" */
                if (!strncmp(p, " = ", 3)) p += 2;
                continue;
            }
            while (p < e && o + 1 < cap) buf[o++] = *p++;
            continue;
        }
        buf[o++] = *p++;
    }
    buf[o] = 0;
    return buf;
}

int cli_fail(kiln_ctx *ctx, const char *cmd, kiln_status s)
{
    const char *m = kiln_errmsg(ctx);
    char buf[4096];
    fprintf(stderr, "kiln %s: %s\n", cmd,
            (m && *m) ? cli_flags(m, buf, sizeof buf) : kiln_status_str(s));
    return 1;
}

const char *cli_errmsg(kiln_ctx *ctx, char *buf, size_t cap)
{
    return cli_flags(kiln_errmsg(ctx), buf, cap);
}

/* The library's log lines, with flags for option fields. */
static void cli_log(void *user, kiln_log_level level, const char *msg)
{
    (void)user;
    static const char *const tag[] = {"error", "warn", "info", "debug"};
    char buf[4096];
    fprintf(stderr, "kiln: %s: %s\n", (unsigned)level < 4 ? tag[level] : "log",
            cli_flags(msg, buf, sizeof buf));
}

/* The settings every command maps from the environment onto a new ctx
 * (docs/architecture.md, "Settings"): the cache folder, $XDG_CACHE_HOME/kiln
 * or else ~/.cache/kiln (precision AUTO's probe result lives there), and
 * KILN_PRECISION_PROBE=0, which trusts the capability table instead of
 * measuring (the same as --no-precision-probe). */
kiln_ctx *cli_ctx_new(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    if (!ctx) return NULL;
    kiln_set_log_fn(ctx, cli_log, NULL);
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    char dir[4096];
    dir[0] = 0;
    if (xdg && *xdg == '/') snprintf(dir, sizeof dir, "%s/kiln", xdg);
    else if (home && *home) snprintf(dir, sizeof dir, "%s/.cache/kiln", home);
    if (dir[0]) kiln_set_cache_dir(ctx, dir); /* out of memory: no cache */
    const char *e = getenv("KILN_PRECISION_PROBE");
    if (e && !strcmp(e, "0")) kiln_set_precision_probe(ctx, false);
    return ctx;
}

bool cli_isatty(void) { return isatty(STDOUT_FILENO) != 0; }

kiln_status cli_apply_adapter(kiln_ctx *ctx, kiln_model **m, const char *adapter)
{
    kiln_status s;
    if (adapter && (s = kiln_model_load_adapter(ctx, m, adapter)))
        return kiln_fail(ctx, s, "--adapter: %s", kiln_errmsg(ctx));
    if (kiln_model_config(*m)->lora_rank > 0) return kiln_model_merge_lora(ctx, m);
    return KILN_OK;
}

kiln_status cli_model_dir(kiln_ctx *ctx, const char *model, char *out, size_t cap)
{
    snprintf(out, cap, "%s", model);
    char cfgp[4200], lp[4200];
    struct stat st;
    snprintf(cfgp, sizeof cfgp, "%s/config.json", model);
    snprintf(lp, sizeof lp, "%s/latest", model);
    if (stat(cfgp, &st) != 0 && stat(lp, &st) == 0)
        return kiln_checkpoint_resolve(ctx, model, out, cap);
    return KILN_OK;
}

bool cli_weight_dtype(const char *cmd, const char *s, kiln_dtype *out)
{
    return cli_weight_dtype_flag(cmd, "--dtype", s, out);
}

bool cli_weight_dtype_flag(const char *cmd, const char *flag, const char *s, kiln_dtype *out)
{
    static const struct {
        const char *name;
        kiln_dtype t;
    } k[] = {{"fp32", KILN_DTYPE_F32}, {"f32", KILN_DTYPE_F32}, {"bf16", KILN_DTYPE_BF16},
             {"q8_0", KILN_DTYPE_Q8_0}, {"q4_0", KILN_DTYPE_Q4_0}, {"q4_k", KILN_DTYPE_Q4_K},
             {"q6_k", KILN_DTYPE_Q6_K}};
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
        if (!strcmp(s, k[i].name)) {
            *out = k[i].t;
            return true;
        }
    fprintf(stderr, "kiln %s: %s '%s' is not one of %s\n", cmd, flag, s, CLI_WEIGHT_DTYPES);
    return false;
}

kiln_status cli_load_draft(kiln_ctx *ctx, const char *draft, const char *tok_spec,
                           const kiln_config *tcfg, const kiln_tokenizer *ttok,
                           const kiln_engine_opts *teo, kiln_engine **out)
{
    *out = NULL;
    char dir[4096];
    kiln_model *m = NULL;
    kiln_tokenizer *dtok = NULL;
    kiln_status st = cli_model_dir(ctx, draft, dir, sizeof dir);
    if (!st) st = kiln_checkpoint_verify(ctx, dir);
    if (!st) st = kiln_model_load(ctx, dir, &m);
    if (!st && kiln_tokenizer_load(ctx, dir, &dtok) &&
        (!tok_spec || kiln_tokenizer_load(ctx, tok_spec, &dtok))) {
        char why[1024];
        snprintf(why, sizeof why, "%s", kiln_errmsg(ctx));
        st = kiln_fail(ctx, KILN_ERR_FORMAT,
                       "the draft %s has no tokenizer to check against the target's (%s)", dir,
                       why);
    }
    if (!st) st = kiln_spec_check(ctx, tcfg, ttok, kiln_model_config(m), dtok);
    kiln_engine_opts eo = *teo;
    /* a .gguf draft keeps its stored types unless a --dtype was asked */
    eo.weights_gguf = cli_is_gguf(dir) && teo->wtype == KILN_DTYPE_F32 ? dir : NULL;
    if (m && eo.n_ctx > kiln_model_config(m)->n_ctx) eo.n_ctx = 0; /* the draft's own */
    if (!st) st = kiln_engine_new(ctx, m, &eo, out);
    kiln_model_free(m);
    kiln_tokenizer_free(dtok);
    return st;
}

bool cli_is_gguf(const char *path)
{
    char magic[4] = {0};
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    size_t n = fread(magic, 1, 4, f);
    fclose(f);
    return n == 4 && !memcmp(magic, "GGUF", 4);
}
