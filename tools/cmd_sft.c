/*
 * cmd_sft.c — `kiln sft`: supervised fine-tuning of a model on chat or
 * prompt/completion JSONL.
 *
 * The examples are loaded and rendered by the library (kiln_dataset_load:
 * the chat template, the loss mask), split into training and held-out
 * examples, laid out one per row (kiln_dataset_rows: padding, targets -1
 * where no loss is taken) or, with --packing, several per row
 * (kiln_dataset_pack_rows: attention kept inside each example, positions
 * restarting per example) and handed to the trainer as its row source
 * (kiln_train_opts.rows) with the masked cross-entropy objective. The
 * run's own settings (model, data, split, loss_on, max_len) are written to
 * RUN/sft.json so that --resume rebuilds the same rows; the trainer's
 * checkpoints carry the rest (options, data position, rng), which makes a
 * resumed run continue bit for bit.
 */
#include "cli.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct sft_args {
    const char *model, *data, *val_data, *loss_on;
    double val_fraction;
    int max_len;
    bool skip_bad, pack;
} sft_args;

static int parse_loss_on(const char *s)
{
    if (!strcmp(s, "assistant")) return KILN_LOSS_ON_MASK;
    if (!strcmp(s, "all")) return KILN_LOSS_ON_ALL;
    if (!strcmp(s, "completion")) return KILN_LOSS_ON_COMPLETION;
    return -1;
}

/* RUN/sft.json: what rebuilds the rows on --resume. */
static int save_args(const char *out, const sft_args *a)
{
    /* absolute paths: a resume may start from another directory */
    char m[PATH_MAX], d[PATH_MAX], v[PATH_MAX];
    if (!realpath(a->model, m)) snprintf(m, sizeof m, "%s", a->model);
    if (!realpath(a->data, d)) snprintf(d, sizeof d, "%s", a->data);
    if (a->val_data && !realpath(a->val_data, v)) snprintf(v, sizeof v, "%s", a->val_data);
    json_t *j = json_pack("{s:s,s:s,s:s?,s:f,s:s,s:i,s:b,s:b}", "model", m, "data", d,
                          "val_data", a->val_data ? v : NULL, "val_fraction", a->val_fraction, "loss_on",
                          a->loss_on, "max_len", a->max_len, "skip_bad_lines", a->skip_bad,
                          "packing", a->pack);
    return cli_save_run_json("sft", out, "sft.json", j);
}

/* Fills the settings not given on the command line from RUN/sft.json; the
 * strings are copied into keep (freed by the caller with json_decref). */
static int load_args(const char *run, int argc, char **argv, sft_args *a, json_t **keep)
{
    char path[4200]; /* for the messages below */
    snprintf(path, sizeof path, "%s/sft.json", run);
    json_t *j = cli_load_run_json("sft", run, "sft.json");
    if (!j) return 1;
    *keep = j;
    const char *model = json_string_value(json_object_get(j, "model"));
    const char *data = json_string_value(json_object_get(j, "data"));
    const char *lo = json_string_value(json_object_get(j, "loss_on"));
    if (!model || !data || !lo) {
        fprintf(stderr, "kiln sft: %s: \"model\", \"data\" or \"loss_on\" is missing\n", path);
        return 1;
    }
    if (!cli_given(argc, argv, "model")) a->model = model;
    if (!cli_given(argc, argv, "data")) a->data = data;
    if (!cli_given(argc, argv, "loss-on")) a->loss_on = lo;
    if (!cli_given(argc, argv, "val-data"))
        a->val_data = json_string_value(json_object_get(j, "val_data"));
    if (!cli_given(argc, argv, "val-fraction"))
        a->val_fraction = json_number_value(json_object_get(j, "val_fraction"));
    if (!cli_given(argc, argv, "max-len"))
        a->max_len = (int)json_integer_value(json_object_get(j, "max_len"));
    if (!cli_given(argc, argv, "skip-bad") && !cli_given(argc, argv, "skip-bad-lines"))
        a->skip_bad = json_is_true(json_object_get(j, "skip_bad_lines"));
    if (!cli_given(argc, argv, "packing")) a->pack = json_is_true(json_object_get(j, "packing"));
    return 0;
}

static void print_stats(const char *what, const kiln_dataset *ds)
{
    kiln_dataset_stats st;
    kiln_dataset_get_stats(ds, &st);
    printf("%s: %lld examples (%lld lines, %lld bad, %lld cut to --max-len, %lld dropped), "
           "%lld tokens, %lld loss tokens\n",
           what, (long long)st.examples, (long long)st.lines, (long long)st.bad_lines,
           (long long)st.truncated, (long long)st.dropped, (long long)st.tokens,
           (long long)st.loss_tokens);
}

/* --packing's summary: how full the packed rows are, against one example
 * per row padded to the longest. */
static void print_packing(const kiln_packed *p)
{
    size_t cells = (size_t)p->rows * (size_t)p->T, used = 0, longest = 0, run = 0;
    for (size_t c = 0; c < cells; c++) {
        used += p->doc[c] >= 0;
        run = p->doc[c] >= 0 && p->pos[c] > 0 ? run + 1 : p->doc[c] >= 0;
        if (run > longest) longest = run;
    }
    size_t unpacked = (size_t)p->examples * longest;
    printf("packing: %lld examples in %lld rows, %.1f%% of positions filled (%zu of %zu); one "
           "per row would be %lld rows of %zu, %.1f%% filled: %.2fx fewer positions\n",
           (long long)p->examples, (long long)p->rows, cells ? 100.0 * used / cells : 0.0, used,
           cells, (long long)p->examples, longest, unpacked ? 100.0 * used / unpacked : 0.0,
           cells ? (double)unpacked / cells : 0.0);
}

int cmd_sft(int argc, char **argv)
{
    cli_train_block_signals(); /* before any thread starts */
    cli_tune tu;
    cli_tune_defaults(&tu);
    kiln_train_opts o; /* tu.o once the flags are read */
    sft_args a = {.loss_on = "assistant", .val_fraction = 0.1};
    bool skip_bad_lines = false;
    cli_opt opts[16 + CLI_TUNE_NFLAGS] = {
        {"model", CLI_STR, &a.model, "model directory (or run directory: its newest checkpoint; or a .gguf file, imported into OUT/base with its chat template) to fine-tune", false},
        {"data", CLI_STR, &a.data, "JSONL: {\"messages\":[...]} or {\"prompt\",\"completion\"} per line", false},
        {"val-data", CLI_STR, &a.val_data, "held-out JSONL for val_loss (instead of --val-fraction)", false},
        {"val-fraction", CLI_F64, &a.val_fraction, "share of --data held out for val_loss, in [0, 1) [0.1]", false},
        {"loss-on", CLI_STR, &a.loss_on, "assistant | completion | all: tokens learned: every assistant turn (or the completion), the last one only, or every token [assistant]", false},
        {"max-len", CLI_INT, &a.max_len, "tokens per example kept (longer ones are cut) [the model's n_ctx + 1]", false},
        {"packing", CLI_BOOL, &a.pack, "several examples per row of --max-len - 1 positions (first fit), attention kept inside each example and positions restarting per example (padding-free training; same loss as unpadded rows) [off: one example per row, padded to the longest]", false},
        {"skip-bad", CLI_BOOL, &a.skip_bad, "skip malformed JSONL lines (each is still reported) instead of failing", false},
        {"skip-bad-lines", CLI_BOOL, &skip_bad_lines, "the same as --skip-bad", false},
    };
    cli_tune_flags(&tu, opts + 9, "examples per micro-batch [8]");
    int rc = cli_parse("sft", "sft --model DIR --data FILE.jsonl --out DIR [flags]\n       kiln sft --resume RUN_DIR [flags]",
                       "Supervised fine-tuning: full training of a model's weights on chat\n"
                       "({\"messages\":[{\"role\",\"content\"},...]}) or prompt/completion JSONL,\n"
                       "rendered with the model's chat template (tokenizer_config.json) or\n"
                       "ChatML; the loss is the mean cross-entropy over the learned tokens\n"
                       "(--loss-on). One example per row, padded, or with --packing several\n"
                       "per row, each attending only to itself. With --lora-rank, LoRA:\n"
                       "adapters on a frozen base; every checkpoint is then also a PEFT\n"
                       "adapter directory (adapter_config.json, adapter_model.safetensors)\n"
                       "for kiln merge, --adapter or PEFT. Writes RUN/metrics.jsonl\n"
                       "(with loss_tokens per step), RUN/step_*/ checkpoints (kiln model\n"
                       "directories) and RUN/sft.json. Ctrl-C saves and exits 0.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    int ret = 2;
    char ckpt[1024], databuf[4096], outbuf[1024], model_dir[4200], tokj[4300];
    json_t *saved_args = NULL;
    kiln_tokenizer *tok = NULL;
    kiln_dataset *ds = NULL, *vds = NULL;
    kiln_packed *rows = NULL, *vrows = NULL;
    size_t *tr_idx = NULL, *va_idx = NULL;
    kiln_status s = KILN_OK;
    a.skip_bad = a.skip_bad || skip_bad_lines;
    if (!(a.val_fraction >= 0 && a.val_fraction < 1)) {
        fprintf(stderr, "kiln sft: --val-fraction %g must be in [0, 1)\n", a.val_fraction);
        goto done;
    }
    if (cli_given(argc, argv, "max-len") && a.max_len < 2) {
        fprintf(stderr, "kiln sft: --max-len %d must be at least 2 (a token and its target)\n",
                a.max_len);
        goto done;
    }
    if (!cli_tune_check("sft", &tu, argc, argv)) goto done;
    const char *resume = tu.resume;
    if (resume) {
        if ((ret = cli_tune_resume(ctx, "sft", &tu, argc, argv, ckpt, sizeof ckpt, databuf,
                                   sizeof databuf, outbuf, sizeof outbuf)))
            goto done;
        ret = 2;
        if (load_args(outbuf, argc, argv, &a, &saved_args)) goto done;
    } else if (!a.model || !*a.model || !a.data || !*a.data || !tu.o.out || !*tu.o.out) {
        fprintf(stderr, "kiln sft: --model, --data and --out are required (or --resume RUN_DIR; "
                        "see kiln sft --help)\n");
        goto done;
    }
    int loss_on = parse_loss_on(a.loss_on);
    if (loss_on < 0) {
        fprintf(stderr, "kiln sft: --loss-on '%s' is not one of assistant, completion, all\n",
                a.loss_on);
        goto done;
    }
    o = tu.o;
    if (!cli_train_settings("sft", argc, argv, &tu.f.ef, &o)) goto done;
    cli_precision_probe(ctx, argc, argv, &tu.f.ef);
    ret = 1;
    /* the model, its tokenizer and its context */
    if ((s = cli_model_dir(ctx, a.model, model_dir, sizeof model_dir))) {
        kiln_fail(ctx, s, "--model: %s", kiln_errmsg(ctx));
        goto fail;
    }
    if (!resume && cli_is_gguf(model_dir)) {
        char base[4200];
        if ((s = cli_import_gguf(ctx, model_dir, o.out, base, sizeof base))) {
            kiln_fail(ctx, s, "--model: %s", kiln_errmsg(ctx));
            goto fail;
        }
        snprintf(model_dir, sizeof model_dir, "%s", base);
    }
    char cfgp[4400];
    snprintf(cfgp, sizeof cfgp, "%s/config.json", model_dir);
    kiln_config cfg;
    if ((s = kiln_config_load(ctx, cfgp, &cfg))) goto fail;
    if (!resume && (ret = cli_tune_lora(ctx, "sft", &tu, argc, argv, &cfg, &o))) goto done;
    ret = 1;
    if (a.max_len > cfg.n_ctx + 1) {
        fprintf(stderr, "kiln sft: --max-len %d exceeds the model's context (n_ctx %d in %s): "
                        "use --max-len %d or less\n", a.max_len, cfg.n_ctx, cfgp, cfg.n_ctx + 1);
        ret = 2;
        goto done;
    }
    if ((s = kiln_tokenizer_load(ctx, model_dir, &tok))) goto fail;
    snprintf(tokj, sizeof tokj, "%s/tokenizer.json", model_dir);
    /* the examples */
    kiln_dataset_opts dopt = kiln_dataset_opts_default();
    dopt.max_len = a.max_len > 0 ? a.max_len : cfg.n_ctx + 1;
    dopt.skip_bad = a.skip_bad;
    if ((s = kiln_dataset_load(ctx, tok, a.data, KILN_DATASET_SFT, &dopt, &ds))) goto fail;
    if (a.val_data && (s = kiln_dataset_load(ctx, tok, a.val_data, KILN_DATASET_SFT, &dopt, &vds)))
        goto fail;
    size_t n = kiln_dataset_count(ds);
    size_t n_val = 0;
    if (!a.val_data && a.val_fraction > 0 && n >= 2) {
        n_val = (size_t)(a.val_fraction * (double)n + 0.5);
        n_val = n_val < 1 ? 1 : n_val > n - 1 ? n - 1 : n_val;
    }
    if (n - n_val < 1) {
        fprintf(stderr, "kiln sft: %s has no example left to train on\n", a.data);
        goto done;
    }
    tr_idx = malloc((n + 1) * sizeof *tr_idx);
    va_idx = malloc((n + 1) * sizeof *va_idx);
    if (!tr_idx || !va_idx) goto done;
    cli_split_indices(n, n_val, o.seed, tr_idx, va_idx);
    /* rows of one length T: the longest example of either split */
    kiln_loss_on lo = (kiln_loss_on)loss_on;
    int T;
    if (a.pack) { /* rows of max_len - 1 positions, several examples each */
        T = dopt.max_len - 1;
        if ((s = kiln_dataset_pack_rows(ctx, ds, T, lo, tr_idx, n - n_val, &rows))) goto fail;
        s = vds ? kiln_dataset_pack_rows(ctx, vds, T, lo, NULL, 0, &vrows)
            : n_val ? kiln_dataset_pack_rows(ctx, ds, T, lo, va_idx, n_val, &vrows) : KILN_OK;
        if (s) goto fail;
        if (rows->rows < 1) {
            fprintf(stderr, "kiln sft: %s has no example of 2 tokens or more to train on\n",
                    a.data);
            goto done;
        }
    } else {
        if ((s = kiln_dataset_rows(ctx, ds, 0, lo, tr_idx, n - n_val, &rows))) goto fail;
        T = rows->T;
    }
    if (!a.pack && (vds || n_val)) {
        s = vds ? kiln_dataset_rows(ctx, vds, 0, lo, NULL, 0, &vrows)
                : kiln_dataset_rows(ctx, ds, 0, lo, va_idx, n_val, &vrows);
        if (s) goto fail;
        if (vrows->T > T) {
            T = vrows->T;
            kiln_packed_free(rows);
            rows = NULL;
            if ((s = kiln_dataset_rows(ctx, ds, T, lo, tr_idx, n - n_val, &rows))) goto fail;
        } else if (vrows->T < T) {
            kiln_packed_free(vrows);
            vrows = NULL;
            s = vds ? kiln_dataset_rows(ctx, vds, T, lo, NULL, 0, &vrows)
                    : kiln_dataset_rows(ctx, ds, T, lo, va_idx, n_val, &vrows);
            if (s) goto fail;
        }
    }
    print_stats(a.data, ds);
    if (vds) print_stats(a.val_data, vds);
    printf("rows: %lld train, %lld held out, %d positions each; loss on %s\n",
           (long long)rows->rows, (long long)(vrows ? vrows->rows : 0), T, a.loss_on);
    if (a.pack) print_packing(rows);
    fflush(stdout);
    o.seq = T;
    o.rows = rows;
    o.val_rows = vrows;
    o.data = a.data;
    o.tokenizer_json = tokj;
    o.objective = kiln_objective_masked_ce();
    if (!resume) {
        o.init_from = model_dir;
        if (mkdir(o.out, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "kiln sft: --out: cannot create '%s': %s\n", o.out, strerror(errno));
            goto done;
        }
        char lp[1100];
        snprintf(lp, sizeof lp, "%s/latest", o.out);
        FILE *f = fopen(lp, "r");
        if (f) { /* the trainer refuses too; sft.json must not be overwritten */
            fclose(f);
            fprintf(stderr, "kiln sft: '%s' already holds checkpoints of a run; continue it with "
                            "--resume %s, or choose another --out\n", o.out, o.out);
            goto done;
        }
        a.model = model_dir; /* a run directory resolved: its checkpoint now */
        /* under mpirun, rank 0 writes it (the launcher's variables say
         * which rank this is; the library reads them too) */
        const char *rk = getenv("OMPI_COMM_WORLD_RANK");
        if (!rk) rk = getenv("PMIX_RANK");
        if ((!rk || !strcmp(rk, "0")) && save_args(o.out, &a)) goto done;
    }
    kiln_train_result res;
    if ((s = cli_train_run(ctx, &o, &res))) goto fail;
    ret = 0;
    cli_train_report(ctx, "sft", o.out, &res);
    goto done;
fail:
    ret = cli_fail(ctx, "sft", s);
done:
    cli_train_unblock_signals();
    kiln_packed_free(rows);
    kiln_packed_free(vrows);
    free(tr_idx);
    free(va_idx);
    kiln_dataset_free(ds);
    kiln_dataset_free(vds);
    kiln_tokenizer_free(tok);
    json_decref(saved_args);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return ret;
}
