/*
 * cmd_distill.c — `kiln distill`: knowledge distillation of a student
 * model from a teacher on token shards or JSONL text.
 *
 * The teacher (a model directory, a run directory or a .gguf file) is held
 * in an inference engine (kiln_teacher: fp32, bf16 or quantized weights;
 * no gradient, no optimizer state); the student is a model directory or a
 * fresh model from a config.json. The trainer runs the distillation
 * objective (kiln_distill: alpha * CE + (1 - alpha) * tau^2 * D(teacher,
 * student)) with every flag of kiln train. The run's own settings
 * (teacher, its dtype, the divergence, tau, alpha, beta, the data) go to
 * RUN/distill.json so that --resume rebuilds the same objective; the
 * trainer's checkpoints carry the rest, which makes a resumed run continue
 * bit for bit.
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

typedef struct distill_args {
    const char *teacher, *student, *student_config, *data, *tokenizer, *teacher_dtype;
    const char *kd_loss;
    double val_fraction;
} distill_args;

static const char *abs_path(const char *p, char *buf)
{
    if (p && realpath(p, buf)) return buf;
    return p;
}

/* RUN/distill.json: what rebuilds the objective on --resume. */
static int save_args(const char *out, const distill_args *a, const kiln_kd_opts *kd)
{
    char t[PATH_MAX], d[PATH_MAX], s[PATH_MAX], c[PATH_MAX];
    json_t *j = json_pack("{s:s,s:s,s:s,s:f,s:f,s:f,s:s,s:s?,s:s?,s:s?}", "teacher",
                          abs_path(a->teacher, t), "teacher_dtype", a->teacher_dtype, "kd_loss",
                          kiln_kd_loss_name(kd->loss), "temperature", kd->temperature, "alpha",
                          kd->alpha, "beta", kd->beta, "data", abs_path(a->data, d), "tokenizer",
                          a->tokenizer, "student", abs_path(a->student, s), "student_config",
                          abs_path(a->student_config, c));
    return cli_save_run_json("distill", out, "distill.json", j);
}

/* Fills the settings not given on the command line from RUN/distill.json;
 * the strings stay in *keep (freed by the caller with json_decref). */
static int load_args(const char *run, int argc, char **argv, distill_args *a, kiln_kd_opts *kd,
                     json_t **keep)
{
    char path[4200]; /* for the messages below */
    snprintf(path, sizeof path, "%s/distill.json", run);
    json_t *j = cli_load_run_json("distill", run, "distill.json");
    if (!j) return 1;
    *keep = j;
    const char *teacher = json_string_value(json_object_get(j, "teacher"));
    const char *dtype = json_string_value(json_object_get(j, "teacher_dtype"));
    const char *loss = json_string_value(json_object_get(j, "kd_loss"));
    const char *data = json_string_value(json_object_get(j, "data"));
    json_t *tau = json_object_get(j, "temperature"), *alpha = json_object_get(j, "alpha"),
           *beta = json_object_get(j, "beta");
    if (!teacher || !dtype || !loss || !data || !json_is_number(tau) || !json_is_number(alpha) ||
        !json_is_number(beta)) {
        fprintf(stderr, "kiln distill: %s: one of \"teacher\", \"teacher_dtype\", \"kd_loss\", "
                        "\"data\", \"temperature\", \"alpha\", \"beta\" is missing\n", path);
        return 1;
    }
    if (!cli_given(argc, argv, "teacher")) a->teacher = teacher;
    if (!cli_given(argc, argv, "teacher-dtype")) a->teacher_dtype = dtype;
    if (!cli_given(argc, argv, "kd-loss")) a->kd_loss = loss;
    if (!cli_given(argc, argv, "data")) a->data = data;
    if (!cli_given(argc, argv, "tokenizer"))
        a->tokenizer = json_string_value(json_object_get(j, "tokenizer"));
    if (!cli_given(argc, argv, "temperature")) kd->temperature = json_number_value(tau);
    if (!cli_given(argc, argv, "alpha")) kd->alpha = json_number_value(alpha);
    if (!cli_given(argc, argv, "beta")) kd->beta = json_number_value(beta);
    return 0;
}

static bool is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static bool is_file(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* The tokenizer of a model: a .gguf file's own, DIR/tokenizer.json, or
 * NULL when the model has none (buf holds the spec). */
static const char *model_tokenizer(const char *model, char *buf, size_t cap)
{
    if (cli_is_gguf(model)) return model;
    snprintf(buf, cap, "%s/tokenizer.json", model);
    return is_file(buf) ? buf : NULL;
}

/* Teacher and student tokenizers, where both have one: the same tokens
 * (every id decodes to the same bytes). Returns false after printing the
 * first difference. */
static bool same_tokenizer(kiln_ctx *ctx, const char *tspec, const char *sspec,
                           const char *whose)
{
    kiln_tokenizer *a = NULL, *b = NULL;
    bool ok = true;
    if (kiln_tokenizer_load(ctx, tspec, &a) || kiln_tokenizer_load(ctx, sspec, &b)) {
        fprintf(stderr, "kiln distill: cannot load a tokenizer to compare (%s)\n",
                kiln_errmsg(ctx));
        ok = false;
        goto out;
    }
    int na = kiln_tokenizer_vocab_size(a), nb = kiln_tokenizer_vocab_size(b);
    if (na != nb) {
        fprintf(stderr, "kiln distill: the teacher's tokenizer (%s) has %d tokens and the "
                        "%s (%s) %d: the student must learn on the teacher's tokenizer\n",
                tspec, na, whose, sspec, nb);
        ok = false;
        goto out;
    }
    for (int32_t id = 0; id < na && ok; id++) {
        char *x = NULL, *y = NULL;
        size_t lx = 0, ly = 0;
        if (kiln_tokenizer_decode(ctx, a, &id, 1, &x, &lx) ||
            kiln_tokenizer_decode(ctx, b, &id, 1, &y, &ly) || lx != ly || memcmp(x, y, lx)) {
            fprintf(stderr, "kiln distill: the teacher's tokenizer (%s) and the %s (%s) "
                            "differ at token id %d: the student must learn on the teacher's "
                            "tokenizer\n", tspec, whose, sspec, id);
            ok = false;
        }
        free(x);
        free(y);
    }
out:
    kiln_tokenizer_free(a);
    kiln_tokenizer_free(b);
    return ok;
}

/* JSONL (or text) data: tokenized once with the teacher's tokenizer into
 * OUT/data (a resume finds it there). */
static kiln_status tokenize_data(kiln_ctx *ctx, const char *file, const char *tok_spec,
                                 double val_fraction, const char *dir)
{
    char meta[4400];
    snprintf(meta, sizeof meta, "%s/meta.json", dir);
    if (is_file(meta)) return KILN_OK;
    kiln_tokenizer *tok = NULL;
    kiln_status s = kiln_tokenizer_load(ctx, tok_spec, &tok);
    if (s) return kiln_fail(ctx, s, "--tokenizer %s: %s", tok_spec, kiln_errmsg(ctx));
    kiln_tokenize_opts t = kiln_tokenize_opts_default();
    const char *inputs[1] = {file};
    t.tokenizer_spec = tok_spec;
    t.inputs = inputs;
    t.n_inputs = 1;
    t.out_dir = dir;
    t.val_fraction = val_fraction;
    kiln_tokenize_stats st;
    s = kiln_tokenize_corpus(ctx, tok, &t, &st);
    if (!s)
        printf("data: %s tokenized with %s into %s: %lld train, %lld held-out tokens\n", file,
               tok_spec, dir, (long long)st.train_tokens, (long long)st.val_tokens);
    kiln_tokenizer_free(tok);
    return s;
}

/* Under mpirun, rank 0 writes the run's files (the launcher's variables
 * say which rank this is; the library reads them too). */
static bool is_rank0(void)
{
    const char *rk = getenv("OMPI_COMM_WORLD_RANK");
    if (!rk) rk = getenv("PMIX_RANK");
    return !rk || !strcmp(rk, "0");
}

/* Under mpirun, the other ranks wait for rank 0's tokenization: its
 * meta.json is written last (atomically). false after timeout_s seconds,
 * with a message. */
static bool wait_for_data(const char *dir, double timeout_s)
{
    char meta[4400];
    snprintf(meta, sizeof meta, "%s/meta.json", dir);
    for (double waited = 0; waited < timeout_s; waited += 0.2) {
        if (is_file(meta)) return true;
        usleep(200000);
    }
    fprintf(stderr, "kiln distill: rank 0 did not finish tokenizing --data into %s within "
                    "%g s (--dist-timeout); tokenize it first with kiln tokenize and pass "
                    "the directory\n", dir, timeout_s);
    return false;
}

int cmd_distill(int argc, char **argv)
{
    cli_train_block_signals(); /* before any thread starts */
    kiln_train_opts o = kiln_train_opts_default();
    kiln_kd_opts kd = kiln_kd_opts_default();
    distill_args a = {.teacher_dtype = "fp32", .kd_loss = "forward", .val_fraction = 0.02};
    const char *resume = NULL;
    cli_train_flags tf;
    cli_train_flags_init(&tf, &o);
    cli_opt opts[CLI_TRAIN_COMMON_OPTS + 16] = {
        {"teacher", CLI_STR, &a.teacher, "the teacher: a model directory, a run directory (its newest checkpoint) or a .gguf file (its quantized blocks kept); run in inference only", false},
        {"teacher-dtype", CLI_STR, &a.teacher_dtype, "weight storage of the teacher's matrices: " CLI_WEIGHT_DTYPES " (a .gguf keeps its own types) [fp32]", false},
        {"student", CLI_STR, &a.student, "the student to train: a model directory (or run directory) with the teacher's vocabulary", false},
        {"student-config", CLI_STR, &a.student_config, "instead of --student: a config.json for a new, randomly initialised student (--seed)", false},
        {"data", CLI_STR, &a.data, "token shards (a kiln tokenize directory) or a JSONL/text file, tokenized into OUT/data with --tokenizer", false},
        {"tokenizer", CLI_STR, &a.tokenizer, "tokenizer of a JSONL/text --data (tokenizer.json, a directory, a .gguf or 'bytes') [the teacher's]", false},
        {"val-fraction", CLI_F64, &a.val_fraction, "JSONL/text --data: share held out for val_loss, in [0, 1) [0.02]", false},
        {"out", CLI_STR, &o.out, "run directory (checkpoints, metrics.jsonl, distill.json)", false},
        {"resume", CLI_OPTSTR, &resume, "continue a run: a run directory or a step_* checkpoint [--out]", false},
        {"kd-loss", CLI_STR, &a.kd_loss, "forward | reverse | jsd: per token over the whole vocabulary, KL(teacher||student), KL(student||teacher), or GKD's generalized Jensen-Shannon divergence with --beta [forward]", false},
        {"temperature", CLI_F64, &kd.temperature, "tau: both distributions are softmax(logits / tau); the divergence is scaled by tau^2 [1]", false},
        {"alpha", CLI_F64, &kd.alpha, "loss = alpha * CE(data) + (1 - alpha) * tau^2 * divergence; 0 = distillation only [0.5]", false},
        {"beta", CLI_F64, &kd.beta, "jsd: the teacher's share of the mixture m = beta*teacher + (1-beta)*student; 0 = forward KL, 1 = reverse KL [0.5]", false}};
    cli_train_common_opts(opts + 13, &o, &tf); /* the rest stays zero: the end */
    int rc = cli_parse("distill", "distill --teacher DIR|FILE.gguf (--student DIR | --student-config C.json)\n"
                       "       --data SHARDS|FILE.jsonl --out DIR [flags]\n"
                       "       kiln distill --resume RUN_DIR [flags]",
                       "Knowledge distillation: trains the student to match the teacher's\n"
                       "next-token distributions (and, with --alpha, the data). The teacher\n"
                       "runs in inference only, in any weight dtype (quantized included);\n"
                       "both must share the tokenizer (checked). Every training flag of kiln\n"
                       "train applies (precision, threads, schedule, eval/save cadence,\n"
                       "mpirun). The validation loss is the student's plain cross-entropy\n"
                       "on held-out data. Writes RUN/metrics.jsonl, RUN/step_*/ checkpoints\n"
                       "(model directories), RUN/distill.json and RUN/loss.svg. Ctrl-C saves\n"
                       "and exits 0.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    int ret = 2;
    char ckpt[1024], databuf[4096], outbuf[1024], tdir[4200], sdir[4200], ddir[4200];
    char ttok[4300], stok[4300];
    json_t *saved_args = NULL;
    kiln_teacher *teacher = NULL;
    kiln_distill *dist = NULL;
    kiln_status s = KILN_OK;
    if (!cli_train_flags_apply("distill", argc, argv, &tf, &o)) goto done;
    if (resume) {
        const char *where = *resume ? resume : o.out;
        if (!where) {
            fprintf(stderr, "kiln distill: --resume needs a directory (or --out RUN)\n");
            goto done;
        }
        if ((s = kiln_checkpoint_resolve(ctx, where, ckpt, sizeof ckpt))) {
            kiln_fail(ctx, s, "--resume: %s", kiln_errmsg(ctx));
            ret = cli_fail(ctx, "distill", s);
            goto done;
        }
        kiln_train_opts sv = kiln_train_opts_default();
        if ((s = kiln_train_opts_load(ctx, ckpt, &sv, databuf, sizeof databuf))) {
            ret = cli_fail(ctx, "distill", s);
            goto done;
        }
        cli_train_resume_merge(argc, argv, &o, &sv);
        snprintf(outbuf, sizeof outbuf, "%s", ckpt);
        char *sl = strrchr(outbuf, '/');
        if (sl) *sl = 0;
        else snprintf(outbuf, sizeof outbuf, ".");
        if (load_args(outbuf, argc, argv, &a, &kd, &saved_args)) goto done;
        sv.out = o.out ? o.out : outbuf;
        sv.resume = ckpt;
        sv.config = sv.init_from = NULL;
        o = sv;
    } else {
        if (!a.teacher || !a.data || !o.out || (!a.student == !a.student_config)) {
            fprintf(stderr, "kiln distill: --teacher, --data, --out and one of --student or "
                            "--student-config are required (or --resume RUN_DIR; see kiln "
                            "distill --help)\n");
            goto done;
        }
    }
    int kl = kiln_kd_loss_parse(a.kd_loss);
    if (kl < 0) {
        fprintf(stderr, "kiln distill: --kd-loss '%s' is not one of forward, reverse, jsd\n",
                a.kd_loss);
        goto done;
    }
    kd.loss = (kiln_kd_loss)kl;
    if ((s = kiln_kd_opts_validate(ctx, &kd))) {
        ret = cli_fail(ctx, "distill", s);
        goto done;
    }
    kiln_dtype tdt;
    if (!cli_weight_dtype_flag("distill", "--teacher-dtype", a.teacher_dtype, &tdt)) goto done;
    if (!(a.val_fraction >= 0 && a.val_fraction < 1)) {
        fprintf(stderr, "kiln distill: --val-fraction %g must be in [0, 1)\n", a.val_fraction);
        goto done;
    }
    if (!cli_train_settings("distill", argc, argv, &tf.ef, &o)) goto done;
    cli_precision_probe(ctx, argc, argv, &tf.ef);
    ret = 1;
    /* the teacher */
    if ((s = cli_model_dir(ctx, a.teacher, tdir, sizeof tdir))) {
        kiln_fail(ctx, s, "--teacher: %s", kiln_errmsg(ctx));
        goto fail;
    }
    /* the student: its vocabulary and tokenizer */
    kiln_config scfg;
    const char *stok_spec = NULL;
    if (!resume && a.student) {
        if ((s = cli_model_dir(ctx, a.student, sdir, sizeof sdir))) {
            kiln_fail(ctx, s, "--student: %s", kiln_errmsg(ctx));
            goto fail;
        }
        char cp[4400];
        snprintf(cp, sizeof cp, "%s/config.json", sdir);
        if ((s = kiln_config_load(ctx, cp, &scfg))) {
            kiln_fail(ctx, s, "--student: %s", kiln_errmsg(ctx));
            goto fail;
        }
        stok_spec = model_tokenizer(sdir, stok, sizeof stok);
        o.init_from = sdir;
    } else if (!resume) {
        if ((s = kiln_config_load(ctx, a.student_config, &scfg))) {
            kiln_fail(ctx, s, "--student-config: %s", kiln_errmsg(ctx));
            goto fail;
        }
        o.config = a.student_config;
    } else {
        char cp[1100];
        snprintf(cp, sizeof cp, "%s/config.json", ckpt);
        if ((s = kiln_config_load(ctx, cp, &scfg))) goto fail;
    }
    const char *ttok_spec = model_tokenizer(tdir, ttok, sizeof ttok);
    if (ttok_spec && stok_spec && !same_tokenizer(ctx, ttok_spec, stok_spec, "student's")) {
        ret = 2;
        goto done;
    }
    /* token shards written with another tokenizer would pair the teacher's
     * distributions with other tokens' ids */
    char dtok[4300];
    snprintf(dtok, sizeof dtok, "%s/tokenizer.json", a.data);
    if (ttok_spec && is_dir(a.data) && is_file(dtok) &&
        !same_tokenizer(ctx, ttok_spec, dtok, "data's (--data)")) {
        ret = 2;
        goto done;
    }
    /* the teacher, and its vocabulary against the student's, before
     * anything is written */
    if ((s = kiln_teacher_new(ctx, tdir, tdt, o.seq, &teacher))) goto fail;
    const kiln_config *tcfg = kiln_teacher_config(teacher);
    if ((s = kiln_distill_new(ctx, &kd, scfg.vocab_size, tcfg->vocab_size, kiln_teacher_logits,
                              teacher, &dist))) {
        kiln_fail(ctx, s, "--teacher %s and the student: %s", tdir, kiln_errmsg(ctx));
        ret = cli_fail(ctx, "distill", s);
        goto done;
    }
    o.objective = kiln_distill_objective(dist);
    if (!resume) {
        if (mkdir(o.out, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "kiln distill: --out: cannot create '%s': %s\n", o.out,
                    strerror(errno));
            ret = 2;
            goto done;
        }
        char lp[1100];
        snprintf(lp, sizeof lp, "%s/latest", o.out);
        if (access(lp, F_OK) == 0) { /* the trainer refuses too; distill.json must stay */
            fprintf(stderr, "kiln distill: '%s' already holds checkpoints of a run; continue it "
                            "with --resume %s, or choose another --out\n", o.out, o.out);
            ret = 2;
            goto done;
        }
    }
    /* the data: shards as they are, a JSONL/text file tokenized once */
    if (is_dir(a.data)) {
        o.data = a.data;
    } else if (is_file(a.data)) {
        const char *spec = a.tokenizer ? a.tokenizer : ttok_spec;
        if (!spec) {
            fprintf(stderr, "kiln distill: --data %s is a file to tokenize, and the teacher %s "
                            "has no tokenizer.json: name it with --tokenizer\n", a.data, tdir);
            ret = 2;
            goto done;
        }
        a.tokenizer = spec;
        snprintf(ddir, sizeof ddir, "%s/data", o.out);
        if (is_rank0() && (s = tokenize_data(ctx, a.data, spec, a.val_fraction, ddir))) goto fail;
        if (!is_rank0() && !wait_for_data(ddir, o.dist.timeout_s)) goto done;
        o.data = ddir;
    } else {
        fprintf(stderr, "kiln distill: --data %s: no such directory or file\n", a.data);
        ret = 2;
        goto done;
    }
    if (is_rank0()) {
        printf("teacher: %s, L=%d C=%d V=%d, %s weights (%.2f MB), inference only\n", tdir,
               tcfg->n_layer, tcfg->n_embd, tcfg->vocab_size,
               cli_is_gguf(tdir) ? "its GGUF's" : a.teacher_dtype,
               (double)kiln_teacher_weight_bytes(teacher) / 1e6);
        printf("distill: %s KL%s, temperature %g, alpha %g (loss = %g * CE + %g * %g * KD)\n",
               kiln_kd_loss_name(kd.loss), kd.loss == KILN_KD_JSD ? " (generalized JSD)" : "",
               kd.temperature, kd.alpha, kd.alpha, 1 - kd.alpha,
               kd.temperature * kd.temperature);
        fflush(stdout);
    }
    if (!resume) {
        a.teacher = tdir;
        if (a.student) a.student = sdir;
        if (is_rank0() && save_args(o.out, &a, &kd)) goto done;
    }
    kiln_train_result res;
    if ((s = cli_train_run(ctx, &o, &res))) goto fail;
    ret = 0;
    cli_train_report(ctx, "distill", o.out, &res);
    goto done;
fail:
    ret = cli_fail(ctx, "distill", s);
done:
    cli_train_unblock_signals();
    kiln_distill_free(dist);
    kiln_teacher_free(teacher);
    json_decref(saved_args);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return ret;
}
