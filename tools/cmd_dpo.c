/*
 * cmd_dpo.c — `kiln dpo`: direct preference optimisation of a model on
 * {"prompt","chosen","rejected"} JSONL (docs/alignment.md).
 *
 * The pairs are loaded and rendered by the library (kiln_dataset_load,
 * PREFERENCE: the chat template for message lists), split into training
 * and held-out pairs and laid out two rows each (kiln_dataset_pair_rows:
 * targets on the completion tokens only). Before training the reference
 * model (--ref, default the initial policy) runs once over every row in
 * inference and is freed (kiln_dpo_reference); its log-probabilities are
 * cached in RUN/ref_logps.bin, which --resume reads instead of recomputing.
 * The trainer then runs the DPO objective on pairs kept together
 * (kiln_train_opts.row_group = 2) with the training flags kiln sft shares
 * (cli_tune). RUN/dpo.json records what rebuilds the rows on --resume.
 */
#include "cli.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef struct dpo_args {
    const char *model, *ref, *data, *val_data, *loss;
    double val_fraction, beta;
    int max_len;
    bool skip_bad;
} dpo_args;

static void abs_path(const char *p, char *out, size_t cap)
{
    char buf[PATH_MAX];
    if (p && realpath(p, buf)) snprintf(out, cap, "%s", buf);
    else snprintf(out, cap, "%s", p ? p : "");
}

/* RUN/dpo.json: what rebuilds the rows and the objective on --resume. */
static int save_args(const char *out, const dpo_args *a)
{
    char m[4300], r[4300], d[4300], v[4300];
    abs_path(a->model, m, sizeof m);
    abs_path(a->ref, r, sizeof r);
    abs_path(a->data, d, sizeof d);
    abs_path(a->val_data, v, sizeof v);
    json_t *j = json_pack("{s:s,s:s,s:s,s:s?,s:f,s:f,s:s,s:i,s:b}", "model", m, "ref", r, "data",
                          d, "val_data", a->val_data ? v : NULL, "val_fraction", a->val_fraction,
                          "beta", a->beta, "loss", a->loss, "max_len", a->max_len,
                          "skip_bad_lines", a->skip_bad);
    return cli_save_run_json("dpo", out, "dpo.json", j);
}

/* The settings not given on the command line from RUN/dpo.json (strings
 * kept alive by *keep). */
static int load_args(const char *run, int argc, char **argv, dpo_args *a, json_t **keep)
{
    char path[4200]; /* for the messages below */
    snprintf(path, sizeof path, "%s/dpo.json", run);
    json_t *j = cli_load_run_json("dpo", run, "dpo.json");
    if (!j) return 1;
    *keep = j;
    const char *model = json_string_value(json_object_get(j, "model"));
    const char *ref = json_string_value(json_object_get(j, "ref"));
    const char *data = json_string_value(json_object_get(j, "data"));
    const char *loss = json_string_value(json_object_get(j, "loss"));
    if (!model || !ref || !data || !loss) {
        fprintf(stderr, "kiln dpo: %s: \"model\", \"ref\", \"data\" or \"loss\" is missing\n",
                path);
        return 1;
    }
    /* what the run's rows and reference numbers were built from */
    for (const char *f = "model\0ref\0data\0val-data\0val-fraction\0max-len\0"; *f;
         f += strlen(f) + 1)
        if (cli_given(argc, argv, f)) {
            fprintf(stderr, "kiln dpo: --%s cannot change on --resume (the run's rows and "
                            "reference log-probabilities come from %s)\n", f, path);
            return 1;
        }
    a->model = model;
    a->ref = ref;
    a->data = data;
    a->val_data = json_string_value(json_object_get(j, "val_data"));
    a->val_fraction = json_number_value(json_object_get(j, "val_fraction"));
    a->max_len = (int)json_integer_value(json_object_get(j, "max_len"));
    if (!cli_given(argc, argv, "loss")) a->loss = loss;
    if (!cli_given(argc, argv, "beta")) a->beta = json_number_value(json_object_get(j, "beta"));
    if (!cli_given(argc, argv, "skip-bad"))
        a->skip_bad = json_is_true(json_object_get(j, "skip_bad_lines"));
    return 0;
}

static void print_stats(const char *what, const kiln_dataset *ds)
{
    kiln_dataset_stats st;
    kiln_dataset_get_stats(ds, &st);
    printf("%s: %lld pairs (%lld lines, %lld bad, %lld cut to --max-len, %lld dropped), "
           "%lld tokens\n",
           what, (long long)st.examples, (long long)st.lines, (long long)st.bad_lines,
           (long long)st.truncated, (long long)st.dropped, (long long)st.tokens);
}

static bool is_rank0(void)
{
    const char *rk = getenv("OMPI_COMM_WORLD_RANK");
    if (!rk) rk = getenv("PMIX_RANK");
    return !rk || !strcmp(rk, "0");
}

/* The rows of both splits, one length T (the longest of either). */
static kiln_status build_rows(kiln_ctx *ctx, const kiln_dataset *ds, const kiln_dataset *vds,
                              const size_t *tr, size_t n_tr, const size_t *va, size_t n_va,
                              kiln_packed **rows, kiln_packed **vrows)
{
    kiln_status s = kiln_dataset_pair_rows(ctx, ds, 0, tr, n_tr, rows);
    if (s || (!vds && !n_va)) return s;
    s = vds ? kiln_dataset_pair_rows(ctx, vds, 0, NULL, 0, vrows)
            : kiln_dataset_pair_rows(ctx, ds, 0, va, n_va, vrows);
    if (s || (*vrows)->T == (*rows)->T) return s;
    int T = (*rows)->T > (*vrows)->T ? (*rows)->T : (*vrows)->T;
    kiln_packed_free(*rows);
    kiln_packed_free(*vrows);
    *rows = *vrows = NULL;
    s = kiln_dataset_pair_rows(ctx, ds, T, tr, n_tr, rows);
    if (!s)
        s = vds ? kiln_dataset_pair_rows(ctx, vds, T, NULL, 0, vrows)
                : kiln_dataset_pair_rows(ctx, ds, T, va, n_va, vrows);
    return s;
}

int cmd_dpo(int argc, char **argv)
{
    cli_train_block_signals(); /* before any thread starts */
    cli_tune tu;
    cli_tune_defaults(&tu);
    tu.o.batch = 4;
    tu.o.lr = 5e-6;
    kiln_train_opts o;
    dpo_args a = {.loss = "sigmoid", .val_fraction = 0.1, .beta = 0.1};
    cli_opt opts[16 + CLI_TUNE_NFLAGS] = {
        {"model", CLI_STR, &a.model, "model directory (or run directory: its newest checkpoint, e.g. a kiln sft run; or a .gguf file, imported into OUT/base) to train: the initial policy", false},
        {"ref", CLI_STR, &a.ref, "reference model directory (or run directory) for the log-probability ratios [the initial policy, --model]", false},
        {"data", CLI_STR, &a.data, "JSONL: {\"prompt\",\"chosen\",\"rejected\"} per line, strings or message lists", false},
        {"val-data", CLI_STR, &a.val_data, "held-out preference JSONL for the val_ metrics (instead of --val-fraction)", false},
        {"val-fraction", CLI_F64, &a.val_fraction, "share of --data held out, in [0, 1) [0.1]", false},
        {"beta", CLI_F64, &a.beta, "strength of the tie to the reference (TRL's beta), > 0 [0.1]", false},
        {"loss", CLI_STR, &a.loss, "sigmoid | ipo | hinge: TRL's loss_type [sigmoid]", false},
        {"max-len", CLI_INT, &a.max_len, "tokens per prompt + completion kept (completions cut at the end) [the model's n_ctx + 1]", false},
        {"skip-bad", CLI_BOOL, &a.skip_bad, "skip malformed JSONL lines (each is still reported) instead of failing", false},
    };
    cli_tune_flags(&tu, opts + 9, "preference pairs per micro-batch (two rows each: chosen, rejected) [4]");
    for (cli_opt *f = opts; f->name; f++) /* DPO's own default */
        if (!strcmp(f->name, "lr")) f->help = "peak learning rate [5e-6]";
    int rc = cli_parse("dpo", "dpo --model DIR --data PREFS.jsonl --out DIR [flags]\n       kiln dpo --resume RUN_DIR [flags]",
                       "Direct preference optimisation (TRL's DPOTrainer): training of a\n"
                       "model's weights (or, with --lora-rank, of LoRA adapters on a frozen\n"
                       "base, which is then the reference) on {\"prompt\",\"chosen\",\"rejected\"}\n"
                       "JSONL, prompts rendered with the chat template when they are message\n"
                       "lists. The\n"
                       "reference's log-probabilities are computed once before training and\n"
                       "cached in RUN/ref_logps.bin. Each step logs loss and rewards/chosen,\n"
                       "rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,\n"
                       "logps/rejected to RUN/metrics.jsonl (val_ prefixed on held-out pairs).\n"
                       "Ctrl-C saves and exits 0.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    int ret = 2;
    char ckpt[1024], databuf[4096], outbuf[1024], model_dir[4200], ref_dir[4200], tokj[4300];
    char cache[1100];
    json_t *saved_args = NULL;
    kiln_tokenizer *tok = NULL;
    kiln_dataset *ds = NULL, *vds = NULL;
    kiln_packed *rows = NULL, *vrows = NULL;
    size_t *tr_idx = NULL, *va_idx = NULL;
    double *ref_tr = NULL, *ref_va = NULL;
    kiln_dpo *dpo = NULL;
    kiln_status s = KILN_OK;
    if (!(a.val_fraction >= 0 && a.val_fraction < 1)) {
        fprintf(stderr, "kiln dpo: --val-fraction %g must be in [0, 1)\n", a.val_fraction);
        goto done;
    }
    if (cli_given(argc, argv, "max-len") && a.max_len < 2) {
        fprintf(stderr, "kiln dpo: --max-len %d must be at least 2\n", a.max_len);
        goto done;
    }
    if (tu.o.batch < 1) {
        fprintf(stderr, "kiln dpo: --batch %d must be at least 1 (pairs)\n", tu.o.batch);
        goto done;
    }
    tu.o.batch *= 2; /* rows: a chosen and a rejected one per pair */
    if (!cli_tune_check("dpo", &tu, argc, argv)) goto done;
    const char *resume = tu.resume;
    if (resume) {
        if ((ret = cli_tune_resume(ctx, "dpo", &tu, argc, argv, ckpt, sizeof ckpt, databuf,
                                   sizeof databuf, outbuf, sizeof outbuf)))
            goto done;
        ret = 2;
        if (load_args(outbuf, argc, argv, &a, &saved_args)) goto done;
    } else if (!a.model || !*a.model || !a.data || !*a.data || !tu.o.out || !*tu.o.out) {
        fprintf(stderr, "kiln dpo: --model, --data and --out are required (or --resume RUN_DIR; "
                        "see kiln dpo --help)\n");
        goto done;
    }
    int lk = kiln_dpo_loss_parse(a.loss);
    if (lk < 0) {
        fprintf(stderr, "kiln dpo: --loss '%s' is not one of sigmoid, ipo, hinge\n", a.loss);
        goto done;
    }
    o = tu.o;
    if (!cli_train_settings("dpo", argc, argv, &tu.f.ef, &o)) goto done;
    cli_precision_probe(ctx, argc, argv, &tu.f.ef);
    ret = 1;
    /* the policy's initial weights, the reference, the tokenizer */
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
    snprintf(ref_dir, sizeof ref_dir, "%s", model_dir);
    if (a.ref && (s = cli_model_dir(ctx, a.ref, ref_dir, sizeof ref_dir))) {
        kiln_fail(ctx, s, "--ref: %s", kiln_errmsg(ctx));
        goto fail;
    }
    char cfgp[4400];
    snprintf(cfgp, sizeof cfgp, "%s/config.json", model_dir);
    kiln_config cfg;
    if ((s = kiln_config_load(ctx, cfgp, &cfg))) goto fail;
    /* LoRA: adapters on the policy; the reference (by default the same
     * directory) is then the base without them, as PEFT's DPO does */
    if (!resume && (ret = cli_tune_lora(ctx, "dpo", &tu, argc, argv, &cfg, &o))) goto done;
    ret = 1;
    if (a.max_len > cfg.n_ctx + 1) {
        fprintf(stderr, "kiln dpo: --max-len %d exceeds the model's context (n_ctx %d in %s): "
                        "use --max-len %d or less\n", a.max_len, cfg.n_ctx, cfgp, cfg.n_ctx + 1);
        ret = 2;
        goto done;
    }
    if ((s = kiln_tokenizer_load(ctx, model_dir, &tok))) goto fail;
    snprintf(tokj, sizeof tokj, "%s/tokenizer.json", model_dir);
    /* the pairs */
    kiln_dataset_opts dopt = kiln_dataset_opts_default();
    dopt.max_len = a.max_len > 0 ? a.max_len : cfg.n_ctx + 1;
    dopt.skip_bad = a.skip_bad;
    if ((s = kiln_dataset_load(ctx, tok, a.data, KILN_DATASET_PREFERENCE, &dopt, &ds))) goto fail;
    if (a.val_data &&
        (s = kiln_dataset_load(ctx, tok, a.val_data, KILN_DATASET_PREFERENCE, &dopt, &vds)))
        goto fail;
    size_t n = kiln_dataset_count(ds), n_val = 0;
    if (!a.val_data && a.val_fraction > 0 && n >= 2) {
        n_val = (size_t)(a.val_fraction * (double)n + 0.5);
        n_val = n_val < 1 ? 1 : n_val > n - 1 ? n - 1 : n_val;
    }
    if (n - n_val < 1) {
        fprintf(stderr, "kiln dpo: %s has no pair left to train on\n", a.data);
        ret = 2;
        goto done;
    }
    tr_idx = malloc((n + 1) * sizeof *tr_idx);
    va_idx = malloc((n + 1) * sizeof *va_idx);
    if (!tr_idx || !va_idx) goto done;
    cli_split_indices(n, n_val, o.seed, tr_idx, va_idx);
    if ((s = build_rows(ctx, ds, vds, tr_idx, n - n_val, va_idx, n_val, &rows, &vrows)))
        goto fail;
    print_stats(a.data, ds);
    if (vds) print_stats(a.val_data, vds);
    printf("rows: %lld train pairs, %lld held out, %d positions each; loss %s, beta %g\n",
           (long long)rows->rows / 2, (long long)(vrows ? vrows->rows / 2 : 0), rows->T, a.loss,
           a.beta);
    fflush(stdout);
    if (!resume) {
        if (mkdir(o.out, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "kiln dpo: --out: cannot create '%s': %s\n", o.out, strerror(errno));
            goto done;
        }
        char lp[1100];
        snprintf(lp, sizeof lp, "%s/latest", o.out);
        if (access(lp, F_OK) == 0) { /* the trainer refuses too; dpo.json must stay */
            fprintf(stderr, "kiln dpo: '%s' already holds checkpoints of a run; continue it with "
                            "--resume %s, or choose another --out\n", o.out, o.out);
            goto done;
        }
    }
    /* the reference's log-probabilities: once, then the model is freed */
    ref_tr = malloc((size_t)rows->rows * sizeof *ref_tr);
    ref_va = malloc((size_t)(vrows ? vrows->rows : 0) * sizeof *ref_va + 1);
    if (!ref_tr || !ref_va) goto done;
    snprintf(cache, sizeof cache, "%s/ref_logps.bin", o.out);
    kiln_dpo_ref_opts ro = {
        .model_dir = ref_dir,
        .po = {.precision = o.precision, .bf16_kernel = o.bf16_kernel, .bf16_acts = o.bf16_acts},
        .batch = o.batch,
        .threads = o.threads,
        /* a fresh run's other ranks compute their own copy; rank 0 writes */
        .cache_path = resume || is_rank0() ? cache : NULL,
        .require_cache = resume != NULL,
    };
    char ref_id[4300];
    abs_path(ref_dir, ref_id, sizeof ref_id);
    ro.ref_id = ref_id;
    bool cached;
    struct timespec ts0, ts1;
    clock_gettime(CLOCK_MONOTONIC, &ts0);
    if ((s = kiln_dpo_reference(ctx, &ro, rows, vrows, ref_tr, ref_va, &cached))) {
        kiln_fail(ctx, s, "%s (the reference): %s", a.ref && !resume ? "--ref" : "--model",
                  kiln_errmsg(ctx));
        goto fail;
    }
    clock_gettime(CLOCK_MONOTONIC, &ts1);
    if (cached)
        printf("reference: log-probabilities of %lld rows read from %s\n",
               (long long)(rows->rows + (vrows ? vrows->rows : 0)), cache);
    else
        printf("reference: %s over %lld rows in %.1f s (cached in %s)\n", ref_dir,
               (long long)(rows->rows + (vrows ? vrows->rows : 0)),
               (double)(ts1.tv_sec - ts0.tv_sec) + 1e-9 * (double)(ts1.tv_nsec - ts0.tv_nsec),
               cache);
    fflush(stdout);
    kiln_dpo_opts dop = kiln_dpo_opts_default();
    dop.beta = a.beta;
    dop.loss = (kiln_dpo_loss)lk;
    if ((s = kiln_dpo_new(ctx, &dop, ref_tr, rows->rows, vrows ? ref_va : NULL,
                          vrows ? vrows->rows : 0, &dpo)))
        goto fail;
    o.seq = rows->T;
    o.rows = rows;
    o.val_rows = vrows;
    o.row_group = 2;
    o.data = a.data;
    o.tokenizer_json = tokj;
    o.objective = kiln_dpo_objective(dpo);
    if (!resume) {
        o.init_from = model_dir;
        a.model = model_dir;
        a.ref = ref_dir;
        if (is_rank0() && save_args(o.out, &a)) goto done;
    }
    kiln_train_result res;
    if ((s = cli_train_run(ctx, &o, &res))) goto fail;
    ret = 0;
    cli_train_report(ctx, "dpo", o.out, &res);
    goto done;
fail:
    ret = cli_fail(ctx, "dpo", s);
done:
    cli_train_unblock_signals();
    kiln_dpo_free(dpo);
    free(ref_tr);
    free(ref_va);
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
