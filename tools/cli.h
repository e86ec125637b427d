/*
 * cli.h — shared pieces of the kiln command: the subcommand entry points
 * (one file per family, tools/cmd_<family>.c) and a small long-flag parser
 * that gives every subcommand the same --help and error messages.
 */
#ifndef KILN_CLI_H
#define KILN_CLI_H

#include "kiln.h"

#include <stdbool.h>
#include <stdint.h>

/* Flag kinds. */
typedef enum cli_kind {
    CLI_STR,   /* const char **         --name VALUE                      */
    CLI_INT,   /* int *                 --name 12                         */
    CLI_I64,   /* int64_t *             --name 12                         */
    CLI_F64,   /* double *              --name 0.5                        */
    CLI_BOOL,  /* bool *                --name (no value) sets true       */
    CLI_LIST,  /* cli_list *            --name A B C (until the next --)  */
    CLI_OPTSTR /* const char **         --name [VALUE]; "" when no value  */
} cli_kind;

typedef struct cli_list {
    const char **items;
    int n;
} cli_list;

typedef struct cli_opt {
    const char *name; /* without the leading "--" */
    cli_kind kind;
    void *dst;
    const char *help; /* "help text [default]" */
    bool required;
} cli_opt;

/* Parses argv (argv[0] is the subcommand name) against opts, terminated by
 * an entry with name == NULL. Positional arguments are collected into
 * *pos (may be NULL when none are accepted). Returns 0 on success, 1 when
 * --help was printed (exit 0), 2 on a usage error (message printed to
 * stderr naming the flag; exit 2). `usage` is the one-line synopsis and
 * `about` a paragraph printed by --help. The cli_list arrays point into
 * argv and are malloc'ed (free with cli_free). */
int cli_parse(const char *cmd, const char *usage, const char *about,
              cli_opt *opts, int argc, char **argv, cli_list *pos);
void cli_free(cli_opt *opts, cli_list *pos);

/* Prints "kiln CMD: <kiln_errmsg>" to stderr, option fields shown as
 * flags (cli_flags), and returns exit code 1. */
int cli_fail(kiln_ctx *ctx, const char *cmd, kiln_status s);

/* The library names options by field ("kiln_train_opts.batch = 0 ...");
 * the command shows its flags. Copies msg to buf (cap bytes) with every
 * field the table in cli.c knows replaced by its flag ("FIELD = V" becomes
 * "--flag V"); unknown fields stay as they are. Returns buf. */
const char *cli_flags(const char *msg, char *buf, size_t cap);
/* The flag of one field (len bytes at field), or NULL when none. */
const char *cli_flag_of(const char *field, size_t len);
/* kiln_errmsg(ctx) through cli_flags. */
const char *cli_errmsg(kiln_ctx *ctx, char *buf, size_t cap);
/* kiln_ctx_new with the library's log lines printed through cli_flags. */
kiln_ctx *cli_ctx_new(void);

/* What --model names: a model or checkpoint directory as given, or a run
 * directory (a 'latest' file and no config.json) as its newest checkpoint
 * (kiln_checkpoint_resolve). The directory to load goes to out (cap
 * bytes). */
kiln_status cli_model_dir(kiln_ctx *ctx, const char *model, char *out, size_t cap);
/* --adapter DIR (may be NULL): the PEFT LoRA adapter read over *m and
 * merged in; a model that has adapters already (a LoRA run's checkpoint)
 * is merged too, the form the engine runs. */
kiln_status cli_apply_adapter(kiln_ctx *ctx, kiln_model **m, const char *adapter);

/* True when stdout is a terminal (progress bars) . */
bool cli_isatty(void);

/* ---- shared by kiln train and kiln sft (tools/cmd_train.c) ---------- */

/* True when --name was given on the command line. */
bool cli_given(int argc, char **argv, const char *name);
/* The settings flags that older scripts also set through environment
 * variables (docs/architecture.md, "Settings"). */
typedef struct cli_env_flags {
    const char *bf16_kernel, *optim_kernel;
    double loss_scale, dist_timeout, dist_bucket_mb;
    bool fp32_acts, no_dist_overlap, no_dist_progress;
    bool no_precision_probe; /* applied to the ctx: cli_precision_probe */
} cli_env_flags;
/* --no-precision-probe given: precision auto trusts the capability table
 * on ctx (KILN_PRECISION_PROBE=0 is read by cli_ctx_new). */
void cli_precision_probe(kiln_ctx *ctx, int argc, char **argv, const cli_env_flags *f);
/* Applies the flags given, else the environment variables set, to *o.
 * Returns false after printing what is wrong ("kiln CMD: ..."). */
bool cli_train_settings(const char *cmd, int argc, char **argv, const cli_env_flags *f,
                        kiln_train_opts *o);
/* auto | bar | lines | none as a kiln_progress, -1 when unknown. */
int cli_parse_progress(const char *s);
/* Blocks SIGINT, SIGTERM and SIGUSR1 in this thread and every thread
 * started after (call first, before any thread starts); the unblock. */
void cli_train_block_signals(void);
void cli_train_unblock_signals(void);
/* kiln_train with the stop signals taken by a thread of its own: the
 * first finishes the step, saves and returns (res->interrupted), the
 * second quits. Sets o->stop_flag. */
kiln_status cli_train_run(kiln_ctx *ctx, kiln_train_opts *o, kiln_train_result *res);
/* What a finished run says (rank 0 only; nothing on other ranks): the loss
 * plot RUN/loss.svg drawn, then "done: step N, loss L[, val_loss V]", the
 * checkpoint, metrics and plot (and, for a LoRA run, its PEFT adapter
 * directory), or for an interrupted run where it stopped and
 * "resume with: kiln CMD --resume RUN". */
void cli_train_report(kiln_ctx *ctx, const char *cmd, const char *out,
                      const kiln_train_result *res);

/* The flags of a training run that kiln train and kiln distill share
 * (batch, seq, ..., lr, schedule, steps, eval/save cadence, seed, threads,
 * precision, the settings of cli_env_flags, MPI): the string and bool
 * flags land here, the rest in kiln_train_opts. */
typedef struct cli_train_flags {
    const char *schedule, *progress, *precision;
    int64_t seed;
    bool sequential;
    cli_env_flags ef;
} cli_train_flags;
/* Entries cli_train_common_opts writes. */
#define CLI_TRAIN_COMMON_OPTS 36
/* schedule cosine, progress auto, precision auto, seed o->seed. */
void cli_train_flags_init(cli_train_flags *f, const kiln_train_opts *o);
/* Writes the shared flags' entries to dst (room for CLI_TRAIN_COMMON_OPTS,
 * not terminated); returns their count. */
int cli_train_common_opts(cli_opt *dst, kiln_train_opts *o, cli_train_flags *f);
/* After parsing: --steps positive when given, seed, shuffle, schedule,
 * progress and precision into *o. false after printing what is wrong. */
bool cli_train_flags_apply(const char *cmd, int argc, char **argv, cli_train_flags *f,
                           kiln_train_opts *o);
/* --resume: the flags given on this command line (in *o) override the
 * checkpoint's options (*saved); threads, progress, max-time, stop-at and
 * zero are always this invocation's. */
void cli_train_resume_merge(int argc, char **argv, const kiln_train_opts *o,
                            kiln_train_opts *saved);

/* A run's own settings file RUN/NAME (sft.json, dpo.json, distill.json,
 * grpo.json), written as NAME.tmp and renamed; takes j (NULL: out of
 * memory) and frees it. 0, or 1 after printing "kiln CMD: cannot write
 * ...". (tools/cli_tune.c) */
struct json_t;
int cli_save_run_json(const char *cmd, const char *out, const char *name, struct json_t *j);
/* RUN/NAME read back for --resume, or NULL after printing "kiln CMD:
 * --resume: cannot read ...: a kiln CMD run directory has it". */
struct json_t *cli_load_run_json(const char *cmd, const char *run, const char *name);

/* ---- shared by kiln sft and kiln dpo (tools/cli_tune.c) ------------- */

/* The fine-tuning commands' training settings and the flags that set them. */
typedef struct cli_tune {
    kiln_train_opts o;
    cli_train_flags f; /* kiln train's shared flags (cli_train_common_opts) */
    const char *resume;
    /* --lora-alpha, --lora-dropout, --lora-targets (--lora-rank is
     * o.lora.rank); cli_tune_lora turns them into o.lora */
    double lora_alpha, lora_dropout;
    const char *lora_targets;
} cli_tune;
/* --out, --resume, cli_train_common_opts's entries less --seq (the
 * examples set the row length) and the four LoRA flags */
enum { CLI_TUNE_NFLAGS = CLI_TRAIN_COMMON_OPTS + 5 };
/* Fine-tuning defaults: lr 2e-5 (min 0, no warmup, no weight decay),
 * eval every 50 steps, save at the end, keep 1. */
void cli_tune_defaults(cli_tune *t);
/* Writes the shared flags' entries (--out, --resume, --batch with
 * batch_help, the optimizer, schedule, cadence, precision and MPI flags)
 * to opts, which has room for CLI_TUNE_NFLAGS; returns how many. */
int cli_tune_flags(cli_tune *t, cli_opt *opts, const char *batch_help);
/* After cli_parse: checks --steps and applies --seed, --sequential,
 * --schedule, --progress and --precision to t->o. false after printing
 * what is wrong ("kiln CMD: ..."). */
bool cli_tune_check(const char *cmd, cli_tune *t, int argc, char **argv);
/* A new run's LoRA flags (t's, o->lora.rank) into o->lora for the base
 * model's config cfg
 * (targets by its architecture; PEFT's default q_proj,v_proj or c_attn),
 * printing what will train. 0, or 2 after printing what is wrong ("kiln
 * CMD: ..."): LoRA flags without --lora-rank, a base that has adapters
 * already, bad targets or values. */
int cli_tune_lora(kiln_ctx *ctx, const char *cmd, const cli_tune *t, int argc, char **argv,
                  const kiln_config *cfg, kiln_train_opts *o);
/* --resume given: resolves the checkpoint (ckpt), loads the options it was
 * started with, applies the flags given on top, and sets t->o to resume
 * it; run receives the run directory. Returns 0, or the exit code after
 * printing the error. */
int cli_tune_resume(kiln_ctx *ctx, const char *cmd, cli_tune *t, int argc, char **argv,
                    char *ckpt, size_t ckpt_cap, char *databuf, size_t data_cap, char *run,
                    size_t run_cap);
/* The held-out examples: n_val of n chosen by a seeded shuffle, the rest
 * for training (train, n - n_val) and held out (val, n_val), each list in
 * dataset order. */
void cli_split_indices(size_t n, size_t n_val, uint64_t seed, size_t *train, size_t *val);
/* A .gguf base: imported once into OUT/base (config.json, fp32
 * model.safetensors, tokenizer.json, tokenizer_config.json with the file's
 * chat template), the model directory a run then starts from; its path
 * to base. */
kiln_status cli_import_gguf(kiln_ctx *ctx, const char *gguf, const char *out, char *base,
                            size_t cap);

/* Subcommands. Each returns the process exit code. Families that a build
 * does not have are weak and reported as unavailable by the dispatcher. */
#define KILN_COMMANDS(XX)                                                  \
    XX(init, "write a randomly initialised model directory")               \
    XX(info, "describe a model directory or file")                         \
    XX(eval, "mean next-token loss / perplexity on tokens")                \
    XX(tokenizer, "train, encode and decode tokenizers")                   \
    XX(tokenize, "turn text or JSONL into token shards")                   \
    XX(train, "pretrain or continue training a model")                     \
    XX(plot, "render a run's loss curves to SVG")                          \
    XX(generate, "sample text from a model")                               \
    XX(chat, "interactive chat with a model")                              \
    XX(serve, "OpenAI-compatible HTTP server")                             \
    XX(sft, "supervised fine-tuning")                                      \
    XX(merge, "merge a LoRA adapter into its base model")                  \
    XX(dpo, "direct preference optimisation")                              \
    XX(grpo, "group relative policy optimisation")                         \
    XX(distill, "knowledge distillation")                                  \
    XX(prune, "prune a model")                                             \
    XX(quantize, "quantize a model")                                       \
    XX(export, "export to other formats (GGUF)")                           \
    XX(import, "a GGUF file to a model directory")                               \
    XX(bench, "measure kernels and training speed")

#define KILN_XX_DECL(name, help) \
    int cmd_##name(int argc, char **argv) __attribute__((weak));
KILN_COMMANDS(KILN_XX_DECL)
#undef KILN_XX_DECL

/* The weight storage named by --dtype for the inference commands:
 * fp32 (or f32), bf16, q8_0, q4_0, q4_k, q6_k. false (and a message naming
 * the flag on stderr, prefixed by cmd) for anything else. */
bool cli_weight_dtype(const char *cmd, const char *s, kiln_dtype *out);
/* The same for another flag's name (e.g. --teacher-dtype). */
bool cli_weight_dtype_flag(const char *cmd, const char *flag, const char *s, kiln_dtype *out);
#define CLI_WEIGHT_DTYPES "fp32 | bf16 | q8_0 | q4_0 | q4_k | q6_k"

/* Whether path is a GGUF file (its first bytes are "GGUF"). */
bool cli_is_gguf(const char *path);

/* --draft: loads the draft model (a directory, a run directory or a .gguf;
 * checksums verified), checks that it shares the target's vocabulary and
 * tokenizer (kiln_spec_check, with the draft's own tokenizer; one without
 * a tokenizer is read with tok_spec, the --tokenizer given, when not
 * NULL), and builds
 * its engine with the target's engine options (teo: slots, context
 * capped at the draft's, weight type; a .gguf draft keeps its stored
 * types unless a --dtype other than fp32 was asked). */
kiln_status cli_load_draft(kiln_ctx *ctx, const char *draft, const char *tok_spec,
                           const kiln_config *tcfg, const kiln_tokenizer *ttok,
                           const kiln_engine_opts *teo, kiln_engine **out);

#endif /* KILN_CLI_H */
