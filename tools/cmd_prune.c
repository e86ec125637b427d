/*
 * cmd_prune.c — `kiln prune`: a model made sparse (magnitude, Wanda, 2:4)
 * or smaller (MLP channels removed), with a report of what each layer
 * lost and the perplexity before and after on held-out tokens
 * (docs/prune.md). The pruning itself is kiln_prune (src/compress).
 *
 * Tokens: the validation split of --calib (a kiln tokenize directory):
 * its first --calib-tokens feed the activation-weighted scores, the
 * --eval-tokens after them (disjoint) measure the perplexity.
 */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Copies src to dst through a temporary file and a rename; a missing src
 * is no error (*copied false). */
static kiln_status copy_if_there(kiln_ctx *ctx, const char *src, const char *dst, bool *copied)
{
    *copied = false;
    FILE *in = fopen(src, "rb");
    if (!in) return KILN_OK;
    char tmp[4500];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", dst, (long)getpid());
    FILE *out = fopen(tmp, "wb");
    if (!out) {
        fclose(in);
        return kiln_fail(ctx, KILN_ERR_IO, "cannot write '%s': %s", tmp, strerror(errno));
    }
    char buf[65536];
    size_t n;
    bool ok = true;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, out) != n) ok = false;
    ok = ok && !ferror(in) && fflush(out) == 0 && fsync(fileno(out)) == 0;
    fclose(in);
    if (fclose(out) != 0) ok = false;
    if (!ok || rename(tmp, dst) != 0) {
        unlink(tmp);
        return kiln_fail(ctx, KILN_ERR_IO, "cannot copy '%s' to '%s'", src, dst);
    }
    *copied = true;
    return KILN_OK;
}

/* Zeros and elements of the pruned matrices of each layer. */
typedef struct layer_count {
    size_t zeros, total;
} layer_count;

/* The layer number in a tensor name ("...h.3." / "...layers.3."), or -1. */
static int layer_of(const char *name)
{
    const char *p = strstr(name, ".h.");
    if (p) p += 3;
    else if ((p = strstr(name, "layers."))) p += 7;
    else return -1;
    return (int)strtol(p, NULL, 10);
}

static void count_layers(const kiln_model *m, layer_count *lc, int L, size_t *nonzero)
{
    const float *w = kiln_model_params(m);
    size_t np = kiln_model_num_params(m), nz = 0;
    for (size_t i = 0; i < np; i++) nz += w[i] != 0.0f;
    *nonzero = nz;
    memset(lc, 0, (size_t)L * sizeof *lc);
    for (int i = 0; i < kiln_model_num_tensors(m); i++) {
        if (!kiln_prune_target(m, i)) continue;
        const kiln_tensor_info *t = kiln_model_tensor(m, i);
        int l = layer_of(t->name);
        if (l < 0 || l >= L) continue;
        for (size_t k = 0; k < t->numel; k++) lc[l].zeros += w[t->offset + k] == 0.0f;
        lc[l].total += t->numel;
    }
}

static kiln_status perplexity(kiln_ctx *ctx, kiln_model *m, const int32_t *ids, size_t n, int B,
                              int T, double *loss)
{
    double ls = 0, cnt = 0;
    kiln_status s = kiln_model_set_precision(ctx, m, KILN_PRECISION_FP32);
    if (!s) s = kiln_eval_tokens(ctx, m, ids, n, B, T, &ls, &cnt);
    *loss = cnt > 0 ? ls / cnt : NAN;
    return s;
}

static int parse_enum(const char *flag, const char *v, const char *const *names, int n)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(v, names[i])) return i;
    fprintf(stderr, "kiln prune: --%s '%s' is not one of", flag, v);
    for (int i = 0; i < n; i++) fprintf(stderr, "%s %s", i ? " |" : "", names[i]);
    fprintf(stderr, " (see kiln prune --help)\n");
    return -1;
}

/* The report: printed, and written to OUT/prune_report.json. */
typedef struct report {
    const char *method, *score, *group;
    double sparsity;
    size_t before, after, nonzero;
    int L, F0, F1;
    layer_count *lc;
    double loss0, loss1;
    size_t n_calib, n_eval;
} report;

static void report_print(const report *r)
{
    printf("\nlayer  pruned-matrix sparsity\n");
    for (int l = 0; l < r->L; l++)
        printf("%5d  %6.2f%%  (%zu of %zu zero)\n", l,
               r->lc[l].total ? 100.0 * (double)r->lc[l].zeros / (double)r->lc[l].total : 0.0,
               r->lc[l].zeros, r->lc[l].total);
    printf("parameters: %zu before, %zu after, %zu non-zero (%.2f%% of before)\n", r->before,
           r->after, r->nonzero, 100.0 * (double)r->nonzero / (double)r->before);
    if (r->F1 != r->F0) printf("MLP width (n_inner): %d -> %d\n", r->F0, r->F1);
    if (r->n_eval)
        printf("held-out perplexity (%zu tokens): %.4f before, %.4f after (loss %.4f -> %.4f)\n",
               r->n_eval, exp(r->loss0), exp(r->loss1), r->loss0, r->loss1);
    else
        printf("held-out perplexity: not measured (no --calib)\n");
}

static kiln_status report_save(kiln_ctx *ctx, const char *out, const report *r)
{
    char path[4400], tmp[4500];
    snprintf(path, sizeof path, "%s/prune_report.json", out);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return kiln_fail(ctx, KILN_ERR_IO, "cannot write '%s': %s", tmp, strerror(errno));
    fprintf(f, "{\"method\": \"%s\", \"score\": \"%s\", \"group\": \"%s\", \"sparsity\": %.17g,\n",
            r->method, r->score, r->group, r->sparsity);
    fprintf(f, " \"params_before\": %zu, \"params_after\": %zu, \"nonzero_after\": %zu,\n",
            r->before, r->after, r->nonzero);
    fprintf(f, " \"n_inner_before\": %d, \"n_inner_after\": %d,\n", r->F0, r->F1);
    if (r->n_eval)
        fprintf(f, " \"eval_tokens\": %zu, \"calib_tokens\": %zu, \"loss_before\": %.9g, "
                   "\"loss_after\": %.9g, \"ppl_before\": %.9g, \"ppl_after\": %.9g,\n",
                r->n_eval, r->n_calib, r->loss0, r->loss1, exp(r->loss0), exp(r->loss1));
    fprintf(f, " \"layers\": [");
    for (int l = 0; l < r->L; l++)
        fprintf(f, "%s{\"layer\": %d, \"zeros\": %zu, \"total\": %zu, \"sparsity\": %.9g}",
                l ? ", " : "", l, r->lc[l].zeros, r->lc[l].total,
                r->lc[l].total ? (double)r->lc[l].zeros / (double)r->lc[l].total : 0.0);
    fprintf(f, "]}\n");
    bool ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (fclose(f) != 0) ok = false;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return kiln_fail(ctx, KILN_ERR_IO, "cannot write '%s'", path);
    }
    return KILN_OK;
}

/* The validation split's tokens: calibration first, evaluation after. */
static kiln_status read_tokens(kiln_ctx *ctx, const char *dir, int V, int64_t want_c,
                               int64_t want_e, int32_t **ids, size_t *nc, size_t *ne)
{
    kiln_data *d = NULL;
    kiln_status s = kiln_data_open(ctx, dir, &d);
    if (s) return s;
    size_t n = kiln_data_tokens(d, KILN_SPLIT_VAL);
    if (kiln_data_vocab_size(d) > V) {
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "vocab size mismatch: the data in '%s' has vocab_size %d but the model "
                      "has %d",
                      dir, kiln_data_vocab_size(d), V);
    } else if (n < (size_t)want_c + 2) {
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "--calib '%s': its validation split holds %zu tokens, fewer than "
                      "--calib-tokens %lld plus 2 to measure the perplexity on; tokenize with "
                      "a larger --val-fraction or lower --calib-tokens",
                      dir, n, (long long)want_c);
    } else {
        *nc = (size_t)want_c;
        *ne = n - *nc < (size_t)want_e ? n - *nc : (size_t)want_e;
        *ids = malloc((*nc + *ne) * sizeof **ids);
        if (!*ids) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        else kiln_data_read(d, KILN_SPLIT_VAL, 0, *nc + *ne, *ids);
    }
    kiln_data_close(d);
    return s;
}

int cmd_prune(int argc, char **argv)
{
    const char *model_dir = NULL, *out = NULL, *calib = NULL, *method = NULL;
    const char *score = "wanda", *group = "row";
    double sparsity = 0.5;
    int64_t calib_tokens = 8192, eval_tokens = 16384;
    int B = 4, T = 0, threads = 0;
    bool force = false;
    cli_opt opts[] = {
        {"model", CLI_STR, &model_dir, "model directory, checkpoint, or run directory (its latest checkpoint)", true},
        {"method", CLI_STR, &method, "magnitude | wanda (unstructured) | 2:4 (semi-structured) | mlp (structured: MLP channels removed)", true},
        {"sparsity", CLI_F64, &sparsity, "share removed, in [0, 1): of each output row's weights (of each matrix with --group matrix), of each layer's MLP channels (mlp); 2:4 takes 0.5 only [0.5]", false},
        {"score", CLI_STR, &score, "2:4 and mlp: wanda (|W| x activation norm) | magnitude [wanda]", false},
        {"group", CLI_STR, &group, "magnitude and wanda: row (each output row, the Wanda paper's) | matrix [row]", false},
        {"calib", CLI_STR, &calib, "data directory (kiln tokenize): its validation split gives the calibration tokens and, after them, the held-out tokens of the perplexity report (needed by wanda scores)", false},
        {"calib-tokens", CLI_I64, &calib_tokens, "calibration tokens [8192]", false},
        {"eval-tokens", CLI_I64, &eval_tokens, "held-out tokens for the perplexity before and after [16384]", false},
        {"batch", CLI_INT, &B, "windows per forward pass [4]", false},
        {"seq", CLI_INT, &T, "window length [the model's n_ctx]", false},
        {"threads", CLI_INT, &threads, "compute threads, 0 = all cores [0]", false},
        {"out", CLI_STR, &out, "directory for the pruned model (config.json, model.safetensors, tokenizer, sparsity.json, prune_report.json)", true},
        {"force", CLI_BOOL, &force, "overwrite a model already in --out", false},
        {NULL, 0, NULL, NULL, false}};
    int rc = cli_parse("prune", "prune --model DIR --method magnitude|wanda|2:4|mlp [--sparsity S] --calib DATA --out DIR",
                       "Prunes the four linear matrices of every layer (embeddings, norms, biases\n"
                       "and the LM head stay dense). magnitude and wanda zero the lowest-scored\n"
                       "weights of each output row (score |W|, or |W| x the L2 norm of the\n"
                       "input's activations over the calibration tokens, layer by layer as in\n"
                       "the Wanda paper); 2:4 zeroes 2 of every 4 consecutive inputs of a row;\n"
                       "mlp removes whole MLP channels (the same count in every layer) and\n"
                       "writes a smaller model. A sparse model's zeros stay zero through\n"
                       "kiln train/sft --init-from it (sparsity.json). Reports each layer's\n"
                       "sparsity, the parameters and the held-out perplexity before and after.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    static const char *const methods[] = {"magnitude", "wanda", "2:4", "mlp"};
    static const char *const scores[] = {"wanda", "magnitude"};
    static const char *const groups[] = {"row", "matrix"};
    int mi = parse_enum("method", method, methods, 4);
    int si = mi < 0 ? -1 : parse_enum("score", score, scores, 2);
    int gi = si < 0 ? -1 : parse_enum("group", group, groups, 2);
    if (gi < 0) {
        cli_free(opts, NULL);
        return 2;
    }
    if (calib_tokens < 0 || eval_tokens < 0 || B <= 0 || T < 0) {
        fprintf(stderr, "kiln prune: --calib-tokens and --eval-tokens must be >= 0, --batch > 0 "
                        "and --seq >= 0 (0 = the model's n_ctx)\n");
        cli_free(opts, NULL);
        return 2;
    }
    kiln_prune_opts po = kiln_prune_opts_default();
    po.method = (kiln_prune_method)kiln_prune_method_parse(methods[mi]);
    po.sparsity = sparsity;
    po.score = si == 0 ? KILN_PRUNE_SCORE_WANDA : KILN_PRUNE_SCORE_MAGNITUDE;
    po.group = gi == 0 ? KILN_PRUNE_GROUP_ROW : KILN_PRUNE_GROUP_MATRIX;
    po.batch = B;
    po.seq = T;
    bool needs = po.method == KILN_PRUNE_WANDA ||
                 (po.method != KILN_PRUNE_MAGNITUDE && po.score == KILN_PRUNE_SCORE_WANDA);
    if (needs && !calib) {
        fprintf(stderr, "kiln prune: --method %s%s%s scores by activations: give --calib DATA "
                        "(a kiln tokenize directory with a validation split)%s\n",
                method, po.method == KILN_PRUNE_WANDA ? "" : " --score ",
                po.method == KILN_PRUNE_WANDA ? "" : score,
                po.method == KILN_PRUNE_WANDA ? "" : ", or --score magnitude");
        cli_free(opts, NULL);
        return 2;
    }
    char cp[4400];
    struct stat st;
    snprintf(cp, sizeof cp, "%s/model.safetensors", out);
    if (!force && stat(cp, &st) == 0) {
        fprintf(stderr, "kiln prune: '%s' already holds a model; choose another --out or pass "
                        "--force\n", out);
        cli_free(opts, NULL);
        return 1;
    }
    kiln_ctx *ctx = cli_ctx_new();
    kiln_set_threads(ctx, threads);
    kiln_model *m = NULL, *small = NULL;
    int32_t *ids = NULL;
    size_t nc = 0, ne = 0;
    layer_count *lc = NULL;
    char dir[1024];
    kiln_status s = cli_model_dir(ctx, model_dir, dir, sizeof dir);
    if (!s) s = kiln_checkpoint_verify(ctx, dir);
    if (!s) s = kiln_model_load(ctx, dir, &m);
    if (s) goto fail;
    const kiln_config cfg0 = *kiln_model_config(m);
    if (T == 0) T = po.seq = cfg0.n_ctx;
    if (T > cfg0.n_ctx) {
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG, "--seq %d exceeds the model's n_ctx %d", T,
                      cfg0.n_ctx);
        goto fail;
    }
    kiln_prune_opts early = po; /* the flags' own errors before any work */
    early.method = po.method == KILN_PRUNE_WANDA ? KILN_PRUNE_MAGNITUDE : po.method;
    early.score = KILN_PRUNE_SCORE_MAGNITUDE;
    if ((s = kiln_prune_validate(ctx, m, &early))) goto fail;
    if (calib && (s = read_tokens(ctx, calib, cfg0.vocab_size, calib_tokens,
                                  eval_tokens, &ids, &nc, &ne)))
        goto fail;
    /* the perplexity's tokens come after the calibration tokens whether
     * the method reads them or not, so every method is measured on the
     * same held-out tokens */
    po.calib = ids;
    po.n_calib = nc;
    if ((s = kiln_prune_validate(ctx, m, &po))) goto fail;
    report r = {.method = methods[mi], .score = needs || po.method != KILN_PRUNE_MAGNITUDE
                                                    ? score : "magnitude",
                .group = group, .sparsity = sparsity, .L = cfg0.n_layer, .F0 = cfg0.n_inner,
                .n_calib = nc, .n_eval = ne >= 2 ? ne : 0};
    if (po.method == KILN_PRUNE_2_4 || po.method == KILN_PRUNE_MLP) r.group = "-";
    if (r.n_eval && (s = perplexity(ctx, m, ids + nc, ne, B, T, &r.loss0))) goto fail;
    r.before = kiln_model_num_params(m);
    double t0 = kiln_time_now();
    if ((s = kiln_prune(ctx, m, &po, &small))) goto fail;
    double took = kiln_time_now() - t0;
    kiln_model *pm = small ? small : m;
    r.after = kiln_model_num_params(pm);
    r.F1 = kiln_model_config(pm)->n_inner;
    lc = calloc((size_t)cfg0.n_layer, sizeof *lc);
    if (!lc) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto fail;
    }
    count_layers(pm, lc, cfg0.n_layer, &r.nonzero);
    r.lc = lc;
    if (r.n_eval && (s = perplexity(ctx, pm, ids + nc, ne, B, T, &r.loss1))) goto fail;
    if ((s = kiln_model_save(ctx, pm, out))) goto fail;
    static const char *const extra[] = {"tokenizer.json", "tokenizer_config.json"};
    if (cli_is_gguf(dir)) { /* the file's tokenizer and chat template */
        kiln_tokenizer *tok = NULL;
        char tj[4400];
        snprintf(tj, sizeof tj, "%s/tokenizer.json", out);
        s = kiln_tokenizer_load(ctx, dir, &tok);
        if (!s) s = kiln_tokenizer_save(ctx, tok, tj);
        if (!s) s = kiln_tokenizer_save_chat_config(ctx, tok, out);
        kiln_tokenizer_free(tok);
        if (s) goto fail;
    }
    for (int i = 0; i < 2 && !s && !cli_is_gguf(dir); i++) {
        char a[4400], b[4400];
        bool copied;
        snprintf(a, sizeof a, "%s/%s", dir, extra[i]);
        snprintf(b, sizeof b, "%s/%s", out, extra[i]);
        s = copy_if_there(ctx, a, b, &copied);
    }
    /* unstructured and 2:4: the zeros are the model; mlp leaves none */
    snprintf(cp, sizeof cp, "%s/sparsity.json", out);
    if (!s && !small) s = kiln_prune_mark_save(ctx, out, &po);
    else if (!s) unlink(cp); /* a --force over an earlier sparse model */
    if (!s) s = report_save(ctx, out, &r);
    if (s) goto fail;
    printf("pruned %s (%s) in %.1f s -> %s\n", dir, methods[mi], took, out);
    report_print(&r);
    goto done;
fail:
    rc = cli_fail(ctx, "prune", s);
done:
    free(lc);
    free(ids);
    kiln_model_free(small);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return rc;
}
