/*
 * test_train.c — the trainer end to end on tiny models: overfitting one
 * batch, bit-identical determinism, exact resume (2N straight == N, stop,
 * N more; shuffled loader, gradient accumulation), SIGKILL mid-run then
 * resume, SIGINT saving and exiting 0, corrupted and truncated checkpoints
 * refused by name while the previous one loads, kiln eval agreeing with
 * the trainer's validation loss, and clear errors for bad inputs.
 *
 * Process-level cases run the kiln binary ($KILN) in a child process.
 */
#include "check.h"
#include "kiln.h"
#include "testdata.h"

#include <errno.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *kiln_bin;

/* Text with structure a tiny model can learn: words from a small set. */
static void make_data(const char *dir, size_t ntrain, size_t nval, int vocab)
{
    static const char *words[] = {"the ", "cat ", "sat ", "on ", "a ", "mat. ",
                                  "dog ", "ran ", "far ", "away. ", "\n"};
    kiln_rng r;
    kiln_rng_seed(&r, 99);
    int32_t *ids = malloc((ntrain + nval) * sizeof *ids);
    size_t k = 0;
    while (k < ntrain + nval) {
        const char *w = words[kiln_rng_below(&r, 11)];
        for (; *w && k < ntrain + nval; w++) ids[k++] = (unsigned char)*w;
    }
    test_write_tokens(dir, ids, ntrain, ids + ntrain, nval, vocab, 256);
    free(ids);
}

static void write_config(const char *path, int vocab, int n_ctx)
{
    FILE *f = fopen(path, "w");
    fprintf(f,
            "{\"model_type\":\"gpt2\",\"n_layer\":1,\"n_embd\":32,\"n_head\":2,"
            "\"n_positions\":%d,\"vocab_size\":%d,\"layer_norm_epsilon\":1e-5,"
            "\"tie_word_embeddings\":true}\n",
            n_ctx, vocab);
    fclose(f);
}

static kiln_train_opts base_opts(const char *out)
{
    kiln_train_opts o = kiln_train_opts_default();
    o.config = P("config.json");
    o.data = P("data");
    o.out = out;
    o.batch = 2;
    o.seq = 16;
    o.grad_accum = 2;
    o.lr = 3e-3;
    o.min_lr = 3e-4;
    o.warmup = 3;
    o.steps = 16;
    o.eval_every = 4;
    o.eval_steps = 2;
    o.save_every = 4;
    o.keep_last = 0;
    o.threads = 1;
    o.progress = KILN_PROGRESS_NONE;
    o.seed = 7;
    return o;
}

static char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)len + 1);
    size_t got = fread(p, 1, (size_t)len, f);
    p[got] = 0;
    fclose(f);
    if (n) *n = got;
    return p;
}

/* The "loss" and "val_loss" fields of a metrics.jsonl, in order, as text:
 * equal strings mean bit-identical doubles (printed with 17 digits). */
static char *losses(const char *run)
{
    char path[1100];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    char *t = slurp(path, NULL);
    if (!t) return strdup("(no metrics)");
    size_t cap = strlen(t) + 1, k = 0;
    char *out = calloc(cap, 1);
    for (char *line = strtok(t, "\n"); line; line = strtok(NULL, "\n")) {
        char *step = strstr(line, "\"step\":");
        char *l = strstr(line, "\"loss\":");
        char *v = strstr(line, "\"val_loss\":");
        if (step) k += (size_t)snprintf(out + k, cap - k, "s%ld", strtol(step + 7, NULL, 10));
        if (l) k += (size_t)snprintf(out + k, cap - k, " %.*s", (int)strcspn(l + 7, ",}"), l + 7);
        if (v) k += (size_t)snprintf(out + k, cap - k, " v%.*s", (int)strcspn(v + 11, ",}"), v + 11);
        k += (size_t)snprintf(out + k, cap - k, "\n");
    }
    free(t);
    return out;
}

static bool same_file(const char *a, const char *b)
{
    size_t na, nb;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    bool same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* Runs $KILN with args (NULL-terminated) and returns the child's pid;
 * stdout+stderr go to logfile. */
static pid_t spawn(const char *logfile, const char *const *args)
{
    pid_t pid = fork();
    if (pid == 0) {
        FILE *f = fopen(logfile, "w");
        if (f) {
            dup2(fileno(f), 1);
            dup2(fileno(f), 2);
        }
        execv(kiln_bin, (char *const *)args);
        _exit(127);
    }
    return pid;
}

static int wait_rc(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return WEXITSTATUS(st);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- tests ----------------------------------------------------------- */

static void test_overfit_one_batch(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    /* a training split of exactly one batch: 4 windows of 16+1 */
    make_data(P("one"), 4 * 16 + 1, 200, 257);
    kiln_train_opts o = base_opts(P("run_overfit"));
    o.data = P("one");
    o.batch = 4;
    o.grad_accum = 1;
    o.steps = 150;
    o.lr = 1e-2;
    o.min_lr = 1e-2;
    o.schedule = KILN_SCHEDULE_CONSTANT;
    o.warmup = 0;
    o.weight_decay = 0;
    o.eval_every = 0;
    o.save_every = 0;
    kiln_train_result res;
    kiln_status s = kiln_train(ctx, &o, &res);
    CHECK_MSG(s == KILN_OK, "%s", kiln_errmsg(ctx));
    char *l = losses(o.out);
    double first = 0;
    sscanf(strchr(l, ' ') ? strchr(l, ' ') + 1 : "0", "%lf", &first);
    CHECK_MSG(first > 4.0, "initial loss %g should be near ln(257)=5.55", first);
    CHECK_MSG(res.loss < 0.05, "loss after 150 steps on one batch: %g", res.loss);
    free(l);
    kiln_ctx_free(ctx);
}

static void test_determinism(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_opts a = base_opts(P("run_det_a")), b = base_opts(P("run_det_b"));
    kiln_train_result ra, rb;
    CHECK_EQ(kiln_train(ctx, &a, &ra), KILN_OK);
    CHECK_EQ(kiln_train(ctx, &b, &rb), KILN_OK);
    char *la = losses(a.out), *lb = losses(b.out);
    CHECK_MSG(strcmp(la, lb) == 0, "loss sequences differ:\n%s---\n%s", la, lb);
    CHECK(strstr(la, "s16 ") != NULL);
    CHECK(same_file(P("run_det_a/step_00000016/model.safetensors"),
                    P("run_det_b/step_00000016/model.safetensors")));
    /* the loss went down */
    CHECK_MSG(ra.loss < 5.0, "final loss %g", ra.loss);
    /* and with two threads: two runs agree bit for bit */
    kiln_train_opts t1 = base_opts(P("run_det_t1")), t2 = base_opts(P("run_det_t2"));
    t1.threads = t2.threads = 2;
    t1.steps = t2.steps = 6;
    t1.save_every = t2.save_every = 0;
    CHECK_EQ(kiln_train(ctx, &t1, &rb), KILN_OK);
    CHECK_EQ(kiln_train(ctx, &t2, &rb), KILN_OK);
    char *l1 = losses(t1.out), *l2 = losses(t2.out);
    CHECK_MSG(strcmp(l1, l2) == 0, "2-thread loss sequences differ:\n%s---\n%s", l1, l2);
    CHECK(same_file(P("run_det_t1/step_00000006/model.safetensors"),
                    P("run_det_t2/step_00000006/model.safetensors")));
    free(l1);
    free(l2);
    /* another seed gives another trajectory */
    kiln_train_opts c = base_opts(P("run_det_c"));
    c.seed = 8;
    CHECK_EQ(kiln_train(ctx, &c, &rb), KILN_OK);
    char *lc = losses(c.out);
    CHECK(strcmp(la, lc) != 0);
    free(la);
    free(lb);
    free(lc);
    kiln_ctx_free(ctx);
}

static void test_exact_resume(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_opts a = base_opts(P("run_det_a")); /* 2N = 16 straight */
    kiln_train_opts b = base_opts(P("run_res"));
    b.stop_at = 6; /* N = 6, between checkpoints */
    kiln_train_result rb;
    CHECK_EQ(kiln_train(ctx, &b, &rb), KILN_OK);
    CHECK(rb.interrupted);
    CHECK_EQ(rb.step, 6);
    CHECK(strstr(rb.checkpoint, "step_00000006") != NULL);
    /* resume the way the CLI does: the saved options, then continue */
    char ck[1024], databuf[1024];
    CHECK_EQ(kiln_checkpoint_resolve(ctx, b.out, ck, sizeof ck), KILN_OK);
    kiln_train_opts r = kiln_train_opts_default();
    CHECK_EQ(kiln_train_opts_load(ctx, ck, &r, databuf, sizeof databuf), KILN_OK);
    CHECK_EQ(r.batch, 2);
    CHECK_EQ(r.grad_accum, 2);
    CHECK_EQ(r.steps, 16);
    CHECK(r.shuffle);
    r.out = b.out;
    r.resume = ck;
    r.threads = 1;
    r.progress = KILN_PROGRESS_NONE;
    CHECK_EQ(kiln_train(ctx, &r, &rb), KILN_OK);
    CHECK_EQ(rb.step, 16);
    char *la = losses(a.out), *lb = losses(b.out);
    CHECK_MSG(strcmp(la, lb) == 0, "2N vs N+N losses differ:\n%s---\n%s", la, lb);
    CHECK(same_file(P("run_det_a/step_00000016/model.safetensors"),
                    P("run_res/step_00000016/model.safetensors")));
    CHECK(same_file(P("run_det_a/step_00000016/optimizer.safetensors"),
                    P("run_res/step_00000016/optimizer.safetensors")));
    free(la);
    free(lb);
    kiln_ctx_free(ctx);
}

static const char *const *train_args(const char *out, const char *steps,
                                     const char *extra)
{
    static const char *args[40];
    int k = 0;
    args[k++] = kiln_bin;
    args[k++] = "train";
    args[k++] = "--config";
    args[k++] = P("config.json");
    args[k++] = "--data";
    args[k++] = P("data");
    args[k++] = "--out";
    args[k++] = out;
    const char *fl[] = {"--batch", "2", "--seq", "16", "--grad-accum", "2",
                        "--lr", "3e-3", "--min-lr", "3e-4", "--warmup", "3",
                        "--eval-every", "4", "--eval-steps", "2",
                        "--save-every", "4", "--keep-last", "0", "--threads",
                        "1", "--seed", "7", "--steps", NULL};
    for (int i = 0; fl[i]; i++) args[k++] = fl[i];
    args[k++] = steps;
    if (extra) args[k++] = extra;
    args[k] = NULL;
    return args;
}

static void test_sigkill_then_resume(void)
{
    if (!kiln_bin) {
        CHECK_MSG(0, "$KILN (the kiln binary, built by make tests) is not set or not executable");
        return;
    }
    /* uninterrupted reference, through the CLI */
    char ref[1024], run[1024];
    snprintf(ref, sizeof ref, "%s", P("run_ref60"));
    int rc = wait_rc(spawn(P("ref.log"), train_args(ref, "60", NULL)));
    CHECK_MSG(rc == 0, "reference run exited %d", rc);
    snprintf(run, sizeof run, "%s", P("run_kill"));
    pid_t pid = spawn(P("kill.log"), train_args(run, "60", NULL));
    bool killed = false;
    for (double t0 = kiln_time_now(); !killed && kiln_time_now() - t0 < 120;) {
        if (access(P("run_kill/step_00000008/checksums.json"), F_OK) == 0) {
            kill(pid, SIGKILL);
            killed = true;
        } else {
            sleep_ms(1);
        }
    }
    rc = wait_rc(pid);
    /* a run that finished (or died) before the kill landed tests nothing:
     * that is a failure, not a skip */
    CHECK_MSG(killed, "step 8's checkpoint never appeared within 120 s (exit %d)", rc);
    CHECK_MSG(rc == 128 + SIGKILL, "the run exited %d before SIGKILL reached it", rc);
    if (!killed || rc != 128 + SIGKILL) return;
    /* whatever instant the kill hit, every checkpoint left behind is
     * complete and `latest` names one of them */
    kiln_ctx *ctx = kiln_ctx_new();
    char ck[1024];
    CHECK_EQ(kiln_checkpoint_resolve(ctx, run, ck, sizeof ck), KILN_OK);
    CHECK_MSG(kiln_checkpoint_verify(ctx, ck) == KILN_OK, "%s", kiln_errmsg(ctx));
    for (int st = 4; st <= 60; st += 4) {
        char d[1100];
        snprintf(d, sizeof d, "%s/step_%08d", run, st);
        if (access(d, F_OK) == 0)
            CHECK_MSG(kiln_checkpoint_verify(ctx, d) == KILN_OK, "%s", kiln_errmsg(ctx));
    }
    kiln_ctx_free(ctx);
    const char *args[] = {kiln_bin, "train", "--resume", run, "--threads", "1",
                          "--progress", "lines", NULL};
    rc = wait_rc(spawn(P("resume.log"), args));
    char *log = slurp(P("resume.log"), NULL);
    CHECK_MSG(rc == 0, "resume exited %d:\n%s", rc, log ? log : "");
    CHECK(log && strstr(log, "resumed from"));
    /* not a terminal: plain progress lines, no bar control codes */
    CHECK(log && strstr(log, "step 10/60 | loss ") && !strchr(log, '\r'));
    free(log);
    char *la = losses(ref), *lb = losses(run);
    CHECK_MSG(strcmp(la, lb) == 0, "losses after SIGKILL+resume differ");
    CHECK(same_file(P("run_ref60/step_00000060/model.safetensors"),
                    P("run_kill/step_00000060/model.safetensors")));
    free(la);
    free(lb);
}

static void test_sigint_saves(void)
{
    if (!kiln_bin) {
        CHECK_MSG(0, "$KILN (the kiln binary, built by make tests) is not set or not executable");
        return;
    }
    char run[1024];
    snprintf(run, sizeof run, "%s", P("run_int"));
    pid_t pid = spawn(P("int.log"), train_args(run, "100000", "--save-every=0"));
    /* wait (up to 2 minutes on a loaded machine) until it is training */
    bool going = false;
    for (double t0 = kiln_time_now(); !going && kiln_time_now() - t0 < 120;) {
        char *m = slurp(P("run_int/metrics.jsonl"), NULL);
        going = m && strstr(m, "\"step\":3,");
        free(m);
        if (!going) sleep_ms(2);
    }
    CHECK_MSG(going, "the run did not reach step 3 within 2 minutes");
    kill(pid, SIGINT);
    int rc = wait_rc(pid);
    char *log = slurp(P("int.log"), NULL);
    CHECK_MSG(rc == 0, "exit %d after SIGINT:\n%s", rc, log ? log : "");
    CHECK_MSG(log && strstr(log, "resume with: kiln train --resume"), "%s", log ? log : "");
    free(log);
    char ck[1024];
    kiln_ctx *ctx = kiln_ctx_new();
    CHECK_EQ(kiln_checkpoint_resolve(ctx, run, ck, sizeof ck), KILN_OK);
    CHECK_EQ(kiln_checkpoint_verify(ctx, ck), KILN_OK);
    kiln_ctx_free(ctx);
}

static void corrupt_byte(const char *path, long off)
{
    FILE *f = fopen(path, "r+b");
    fseek(f, off, SEEK_SET);
    int c = fgetc(f);
    fseek(f, off, SEEK_SET);
    fputc(c ^ 0x40, f);
    fclose(f);
}

static void test_corrupt_checkpoint(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    /* run_det_b has step_4, 8, 12, 16; latest = 16 */
    char ck[1024], databuf[1024];
    CHECK_EQ(kiln_checkpoint_resolve(ctx, P("run_det_b"), ck, sizeof ck), KILN_OK);
    CHECK(strstr(ck, "step_00000016") != NULL);
    corrupt_byte(P("run_det_b/step_00000016/model.safetensors"), 200);
    kiln_status s = kiln_checkpoint_verify(ctx, ck);
    CHECK_EQ(s, KILN_ERR_CHECKSUM);
    CHECK_MSG(strstr(kiln_errmsg(ctx), "step_00000016/model.safetensors") &&
                  strstr(kiln_errmsg(ctx), "step_00000012"),
              "%s", kiln_errmsg(ctx));
    /* resuming from it fails with that message; the previous one works */
    kiln_train_opts r = kiln_train_opts_default();
    CHECK_EQ(kiln_train_opts_load(ctx, ck, &r, databuf, sizeof databuf), KILN_OK);
    r.out = P("run_det_b");
    r.resume = ck;
    r.progress = KILN_PROGRESS_NONE;
    r.steps = 20;
    kiln_train_result res;
    CHECK_EQ(kiln_train(ctx, &r, &res), KILN_ERR_CHECKSUM);
    CHECK(strstr(kiln_errmsg(ctx), "model.safetensors") != NULL);
    /* truncation of the optimizer state of step 12 is caught too */
    CHECK_EQ(truncate(P("run_det_b/step_00000012/optimizer.safetensors"), 100), 0);
    CHECK_EQ(kiln_checkpoint_verify(ctx, P("run_det_b/step_00000012")), KILN_ERR_CHECKSUM);
    CHECK_MSG(strstr(kiln_errmsg(ctx), "step_00000012/optimizer.safetensors") &&
                  strstr(kiln_errmsg(ctx), "truncated"),
              "%s", kiln_errmsg(ctx));
    /* step 8 is intact and resumes to the same result as the straight run */
    char *c8 = P("run_det_b/step_00000008");
    CHECK_EQ(kiln_checkpoint_verify(ctx, c8), KILN_OK);
    kiln_train_opts r8 = kiln_train_opts_default();
    CHECK_EQ(kiln_train_opts_load(ctx, c8, &r8, databuf, sizeof databuf), KILN_OK);
    r8.out = P("run_det_b8");
    r8.resume = c8;
    r8.progress = KILN_PROGRESS_NONE;
    r8.threads = 1;
    s = kiln_train(ctx, &r8, &res);
    CHECK_MSG(s == KILN_OK, "%s", kiln_errmsg(ctx));
    CHECK(same_file(P("run_det_a/step_00000016/model.safetensors"),
                    P("run_det_b8/step_00000016/model.safetensors")));
    /* a damaged checksums.json is refused too */
    corrupt_byte(P("run_det_b/step_00000004/checksums.json"), 3);
    CHECK(kiln_checkpoint_verify(ctx, P("run_det_b/step_00000004")) != KILN_OK);
    kiln_ctx_free(ctx);
}

/* Flips one bit of byte off (0-based) and returns the old byte. */
static int flip_at(const char *path, long off)
{
    FILE *f = fopen(path, "r+b");
    if (!f) return -1;
    fseek(f, off, SEEK_SET);
    int c = fgetc(f);
    fseek(f, off, SEEK_SET);
    fputc(c ^ 0x01, f);
    fclose(f);
    return c;
}

static void put_at(const char *path, long off, int c)
{
    FILE *f = fopen(path, "r+b");
    fseek(f, off, SEEK_SET);
    fputc(c, f);
    fclose(f);
}

/* Every file of a checkpoint, with its first, middle and last byte
 * flipped in turn (one bit: the smallest damage), is refused with
 * KILN_ERR_CHECKSUM and a message naming that file; put back, the
 * checkpoint verifies again. checksums.json itself is refused too. */
static void test_checkpoint_flips_refused(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    char *ck = P("run_det_a/step_00000012");
    CHECK_MSG(kiln_checkpoint_verify(ctx, ck) == KILN_OK, "%s", kiln_errmsg(ctx));
    static const char *files[] = {"config.json", "model.safetensors", "optimizer.safetensors",
                                  "trainer_state.json", "checksums.json"};
    int nfiles = 0;
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char *p = P("run_det_a/step_00000012/%s", files[i]);
        struct stat st;
        CHECK_MSG(stat(p, &st) == 0 && st.st_size > 2, "%s missing or empty", p);
        if (stat(p, &st) != 0 || st.st_size <= 2) continue;
        nfiles++;
        long at[3] = {0, (long)st.st_size / 2, (long)st.st_size - 1};
        for (int k = 0; k < 3; k++) {
            int old = flip_at(p, at[k]);
            kiln_status s = kiln_checkpoint_verify(ctx, ck);
            CHECK_MSG(s == KILN_ERR_CHECKSUM, "%s: byte %ld of %ld flipped: status %d",
                      files[i], at[k], (long)st.st_size, (int)s);
            if (strcmp(files[i], "checksums.json"))
                CHECK_MSG(strstr(kiln_errmsg(ctx), files[i]) != NULL,
                          "%s, byte %ld flipped: the message does not name it: %s", files[i],
                          at[k], kiln_errmsg(ctx));
            put_at(p, at[k], old);
            CHECK_MSG(kiln_checkpoint_verify(ctx, ck) == KILN_OK, "%s restored: %s", files[i],
                      kiln_errmsg(ctx));
        }
        /* one byte short: "truncated", by name */
        if (strcmp(files[i], "checksums.json")) {
            size_t len = 0;
            char *keep = slurp(p, &len);
            CHECK_EQ(truncate(p, (off_t)len - 1), 0);
            CHECK_EQ(kiln_checkpoint_verify(ctx, ck), KILN_ERR_CHECKSUM);
            CHECK_MSG(strstr(kiln_errmsg(ctx), files[i]) && strstr(kiln_errmsg(ctx), "truncated"),
                      "%s one byte short: %s", files[i], kiln_errmsg(ctx));
            FILE *w = fopen(p, "wb");
            if (w && keep) fwrite(keep, 1, len, w);
            if (w) fclose(w);
            free(keep);
            CHECK_MSG(kiln_checkpoint_verify(ctx, ck) == KILN_OK, "%s restored: %s", files[i],
                      kiln_errmsg(ctx));
        }
    }
    CHECK_EQ(nfiles, 5);
    kiln_ctx_free(ctx);
}

/* Gradient accumulation is a mean, not a sum: batch 2 x 2 micro-steps
 * gives the same steps as batch 4 x 1 (the same 4 windows per step, the
 * loader's order), up to the summation order of float. */
typedef struct {
    double loss[8], gnorm[8];
} step_vals;

static bool keep_vals(void *user, const kiln_step_info *si)
{
    step_vals *v = user;
    if (si->step >= 1 && si->step <= 8) {
        v->loss[si->step - 1] = si->loss;
        v->gnorm[si->step - 1] = si->grad_norm;
    }
    return true;
}

static void test_accum_equals_batch(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    step_vals a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    for (int k = 0; k < 2; k++) {
        kiln_train_opts o = base_opts(P(k ? "run_acc2" : "run_acc1"));
        o.precision = KILN_PRECISION_FP32;
        o.batch = k ? 2 : 4;
        o.grad_accum = k ? 2 : 1;
        o.steps = 6;
        o.eval_every = 0;
        o.save_every = 0;
        o.on_step = keep_vals;
        o.on_step_user = k ? &b : &a;
        kiln_train_result res;
        CHECK_MSG(kiln_train(ctx, &o, &res) == KILN_OK, "%s", kiln_errmsg(ctx));
    }
    for (int i = 0; i < 6; i++) {
        CHECK_REL(b.loss[i], a.loss[i], 1e-5);
        CHECK_REL(b.gnorm[i], a.gnorm[i], 1e-4);
        CHECK(a.gnorm[i] > 0);
    }
    kiln_ctx_free(ctx);
}

/* on_step sees every step in order with the values metrics.jsonl logs,
 * and returning false stops the run like stop_flag: checkpoint saved,
 * result interrupted. */
typedef struct {
    int64_t seen[32];
    double loss[32], gnorm[32];
    int n;
    int64_t total;
    bool bad;
} step_seen;

static bool stop_at_5(void *user, const kiln_step_info *si)
{
    step_seen *p = user;
    if (p->n < 32) {
        p->seen[p->n] = si->step;
        p->loss[p->n] = si->loss;
        p->gnorm[p->n] = si->grad_norm;
        p->n++;
    }
    p->total = si->total;
    if (!(si->lr > 0) || si->loss_scale != 1.0 || si->skipped || !(si->tokens_per_s > 0))
        p->bad = true;
    return si->step < 5;
}

static void test_on_step_callback(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_opts o = base_opts(P("run_cb"));
    o.precision = KILN_PRECISION_FP32;
    step_seen seen = {0};
    o.on_step = stop_at_5;
    o.on_step_user = &seen;
    kiln_train_result res;
    kiln_status s = kiln_train(ctx, &o, &res);
    CHECK_MSG(s == KILN_OK, "%s", kiln_errmsg(ctx));
    CHECK_EQ(seen.n, 5);
    for (int i = 0; i < seen.n && i < 5; i++) CHECK_EQ(seen.seen[i], i + 1);
    CHECK_EQ(seen.total, 16);
    CHECK(!seen.bad);
    CHECK(res.interrupted);
    CHECK_EQ(res.step, 5);
    CHECK_EQ(res.loss, seen.loss[4]);
    CHECK(strstr(res.checkpoint, "step_00000005") != NULL);
    CHECK_EQ(kiln_checkpoint_verify(ctx, P("run_cb/step_00000005")), KILN_OK);
    /* the values are the ones metrics.jsonl logged for those steps */
    char *m = slurp(P("run_cb/metrics.jsonl"), NULL);
    CHECK(m != NULL);
    for (int i = 0; m && i < 5; i++) {
        char key[64];
        snprintf(key, sizeof key, "\"step\":%d,", i + 1);
        const char *at = strstr(m, key);
        const char *gl = at ? strstr(at, "\"grad_norm\":") : NULL;
        const char *ll = at ? strstr(at, "\"loss\":") : NULL;
        CHECK_MSG(gl && ll, "step %d not in metrics.jsonl", i + 1);
        if (gl && ll) {
            CHECK_REL(strtod(ll + 7, NULL), seen.loss[i], 1e-12);
            CHECK_REL(strtod(gl + 12, NULL), seen.gnorm[i], 1e-12);
        }
    }
    free(m);
    kiln_ctx_free(ctx);
}

static void test_eval_matches_trainer(void)
{
    if (!kiln_bin) {
        CHECK_MSG(0, "$KILN (the kiln binary, built by make tests) is not set or not executable");
        return;
    }
    kiln_ctx *ctx = kiln_ctx_new();
    /* val split of 200 tokens: eval_steps large enough to cover it all */
    kiln_train_opts o = base_opts(P("run_eval"));
    o.steps = 4;
    o.eval_steps = 1000;
    o.precision = KILN_PRECISION_FP32; /* kiln eval computes in fp32 */
    kiln_train_result res;
    CHECK_EQ(kiln_train(ctx, &o, &res), KILN_OK);
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "%s eval --model %s --data %s --batch 2 --seq 16 --json > %s",
             kiln_bin, P("run_eval"), P("data"), P("eval.json"));
    CHECK_EQ(system(cmd), 0);
    char *j = slurp(P("eval.json"), NULL);
    double loss = 0, toks = 0;
    char *l = j ? strstr(j, "\"loss\": ") : NULL;
    char *t = j ? strstr(j, "\"tokens\": ") : NULL;
    if (l) loss = strtod(l + 8, NULL);
    if (t) toks = strtod(t + 10, NULL);
    CHECK_MSG(l && t, "%s", j ? j : "(no output)");
    CHECK_NEAR(loss, res.val_loss, 1e-5);
    CHECK_EQ((long)toks, 199);
    free(j);
    /* the same tokens as raw little-endian uint32 give the same loss */
    kiln_data *d;
    CHECK_EQ(kiln_data_open(ctx, P("data"), &d), KILN_OK);
    int32_t ids[200];
    kiln_data_read(d, KILN_SPLIT_VAL, 0, 200, ids);
    kiln_data_close(d);
    FILE *f = fopen(P("val.u32"), "wb");
    for (int i = 0; i < 200; i++) {
        unsigned char b[4] = {(unsigned char)ids[i], (unsigned char)(ids[i] >> 8), 0, 0};
        fwrite(b, 1, 4, f);
    }
    fclose(f);
    snprintf(cmd, sizeof cmd,
             "%s eval --model %s --tokens %s --batch 3 --seq 16 --json > %s",
             kiln_bin, P("run_eval/step_00000004"), P("val.u32"), P("eval2.json"));
    CHECK_EQ(system(cmd), 0);
    j = slurp(P("eval2.json"), NULL);
    l = j ? strstr(j, "\"loss\": ") : NULL;
    CHECK_MSG(l && fabs(strtod(l + 8, NULL) - loss) < 1e-5, "%s", j ? j : "");
    free(j);
    /* kiln plot renders both curves */
    snprintf(cmd, sizeof cmd, "%s plot %s --out %s > /dev/null", kiln_bin,
             P("run_eval"), P("plot.svg"));
    CHECK_EQ(system(cmd), 0);
    j = slurp(P("plot.svg"), NULL);
    CHECK(j && strstr(j, "<svg") && strstr(j, "</svg>"));
    CHECK(j && strstr(j, "validation loss") && strstr(j, "<polyline"));
    free(j);
    kiln_ctx_free(ctx);
}

static void expect_fail(kiln_train_opts *o, kiln_status want, const char *needle)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_result res;
    kiln_status s = kiln_train(ctx, o, &res);
    CHECK_MSG(s == want, "got %s (%s), want %s", kiln_status_name(s),
              kiln_errmsg(ctx), kiln_status_name(want));
    CHECK_MSG(strstr(kiln_errmsg(ctx), needle) != NULL, "message '%s' lacks '%s'",
              kiln_errmsg(ctx), needle);
    /* the library names options by field, never by a kiln train flag */
    CHECK_MSG(!strstr(kiln_errmsg(ctx), "--"), "message '%s' names a flag", kiln_errmsg(ctx));
    kiln_ctx_free(ctx);
}

static void test_bad_inputs(void)
{
    kiln_train_opts o = base_opts(P("run_bad1"));
    o.data = P("nonexistent");
    expect_fail(&o, KILN_ERR_IO, "does not exist");

    make_data(P("badmagic"), 1000, 100, 257);
    corrupt_byte(P("badmagic/train_0000.bin"), 0);
    o = base_opts(P("run_bad2"));
    o.data = P("badmagic");
    expect_fail(&o, KILN_ERR_FORMAT, "wrong magic");

    make_data(P("trunc"), 1000, 100, 257);
    CHECK_EQ(truncate(P("trunc/val_0000.bin"), 150), 0);
    o = base_opts(P("run_bad3"));
    o.data = P("trunc");
    expect_fail(&o, KILN_ERR_FORMAT, "val_0000.bin' is truncated");

    write_config(P("small_vocab.json"), 100, 64);
    o = base_opts(P("run_bad4"));
    o.config = P("small_vocab.json");
    expect_fail(&o, KILN_ERR_INVALID_ARG, "vocab size mismatch");

    o = base_opts(P("run_bad5"));
    o.seq = 65;
    expect_fail(&o, KILN_ERR_INVALID_ARG, "kiln_train_opts.seq = 65 exceeds");

    o = base_opts(P("run_bad6"));
    o.lr = 1e30;
    o.warmup = 0;
    o.grad_clip = 0;
    o.eval_every = 0;
    expect_fail(&o, KILN_ERR_NUMERIC, "diverged");

    /* a fresh run refuses to overwrite a run directory */
    o = base_opts(P("run_det_a"));
    expect_fail(&o, KILN_ERR_INVALID_ARG, "kiln_train_opts.resume = ");

    if (kiln_bin) { /* the CLI exits non-zero with the message */
        char cmd[2048];
        snprintf(cmd, sizeof cmd, "%s train --data %s --out %s --steps 2 2> %s",
                 kiln_bin, P("nonexistent"), P("run_bad7"), P("cli.err"));
        int rc = system(cmd);
        CHECK(WIFEXITED(rc) && WEXITSTATUS(rc) == 1);
        char *e = slurp(P("cli.err"), NULL);
        CHECK_MSG(e && strstr(e, "kiln train: data directory") && strstr(e, "nonexistent"),
                  "%s", e ? e : "");
        free(e);
        snprintf(cmd, sizeof cmd, "%s eval --model %s --tokens %s 2> %s", kiln_bin,
                 P("run_det_a"), P("badmagic/train_0000.bin"), P("cli.err"));
        rc = system(cmd);
        CHECK(WIFEXITED(rc) && WEXITSTATUS(rc) == 1);
        e = slurp(P("cli.err"), NULL);
        CHECK_MSG(e && strstr(e, "train_0000.bin"), "%s", e ? e : "");
        free(e);
    }
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    kiln_bin = getenv("KILN");
    if (kiln_bin && access(kiln_bin, X_OK) != 0) kiln_bin = NULL;
    snprintf(test_tmp, sizeof test_tmp, "%s/test_train.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    make_data(P("data"), 20000, 200, 257);
    write_config(P("config.json"), 257, 64);
    RUN_TEST(test_overfit_one_batch);
    RUN_TEST(test_determinism);
    RUN_TEST(test_exact_resume);
    RUN_TEST(test_corrupt_checkpoint);
    RUN_TEST(test_checkpoint_flips_refused);
    RUN_TEST(test_on_step_callback);
    RUN_TEST(test_accum_equals_batch);
    RUN_TEST(test_eval_matches_trainer);
    RUN_TEST(test_sigkill_then_resume);
    RUN_TEST(test_sigint_saves);
    RUN_TEST(test_bad_inputs);
    if (!getenv("KILN_KEEP_TMP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf %s", test_tmp);
        if (system(cmd) != 0) return 1;
    }
    return TEST_EXIT();
}
