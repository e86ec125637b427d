/*
 * cmd_grpo.c — `kiln grpo`: reinforcement learning with verifiable rewards
 * (GRPO, DeepSeekMath; TRL GRPOTrainer's loss), full-parameter.
 *
 * One step: P prompts (a seeded shuffle per epoch, so the position alone
 * says which) are rolled out G times each on the inference engine, built
 * from the policy's current weights (kiln_engine_new copies them; it is
 * rebuilt after every optimizer step and freed before training, so the
 * copy exists only during rollouts), all P*G completions sampled together
 * (kiln_generate_batch: the prompt prefilled once per group, one batched
 * decode step per token). The completions are scored (kiln_reward_score),
 * advantages normalised within each group, and the policy takes --updates
 * optimizer steps on the batch with the clipped surrogate (the rollout
 * policy's log-probs are those of the first update's forward, before any
 * step) and the k3 KL to the reference model (a second, frozen copy of the
 * initial weights, only when --beta > 0). Per step, metrics.jsonl and
 * samples.jsonl; checkpoints are model directories with the optimizer and
 * grpo_state.json (step, rollout RNG), so --resume continues bit for bit.
 */
#include "cli.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct grpo_args {
    const char *model, *tokenizer, *prompts, *eval_prompts, *reward, *reward_cmd, *regex, *precision, *schedule;
    int group, max_new, batch_prompts, micro_batch, updates, keep_last, sample_every, top_k;
    double temperature, eval_temperature, top_p, beta, clip, clip_high, lr, min_lr, weight_decay, beta1, beta2,
        eps, grad_clip, tolerance, cmd_timeout;
    int64_t steps, warmup, seed, save_every, eval_every;
    bool dr_grpo, skip_bad;
} grpo_args;

/* The run: everything one step needs. */
typedef struct grpo_run {
    kiln_ctx *ctx;
    grpo_args a;
    const char *out;
    kiln_model *m, *ref;
    kiln_adamw *opt;
    kiln_tokenizer *tok;
    kiln_dataset *ds;
    kiln_dataset *eval_ds; /* --eval-prompts */
    kiln_reward *rw;
    kiln_rng rng;          /* the rollouts' seeds: saved in checkpoints */
    int64_t step, opt_step; /* completed GRPO steps, optimizer steps */
    size_t n_prompts;      /* kept: shorter than the context */
    size_t *keep;          /* (n_prompts) their dataset indices */
    char **prompt_text;    /* (dataset count) decoded, for the reward command */
    size_t *perm;          /* the shuffle of epoch perm_epoch */
    int64_t perm_epoch;
    int32_t stop_id;       /* the chat turn's end, -1 when it is the eot */
    int n_ctx, T_max;
    bool chat;
    kiln_dist *dist;       /* the MPI job (world size 1 without mpirun) */
    bool root;             /* rank 0: logs, writes metrics, samples, checkpoints */
    int p_lo, p_n;         /* this rank's prompts of a step: [p_lo, p_lo + p_n) */
} grpo_run;

/* ---- settings saved for --resume -------------------------------------- */

/* The flags a resumed run keeps from RUN/grpo.json (all but these). */
static bool run_flag(const char *name)
{
    static const char *const own[] = {"out", "resume", "threads", "steps", "dist-timeout", "help", NULL};
    for (int i = 0; own[i]; i++)
        if (!strcmp(name, own[i])) return false;
    return true;
}

static int save_settings(const char *out, const cli_opt *opts)
{
    json_t *j = json_object();
    for (const cli_opt *o = opts; j && o->name; o++) {
        if (!run_flag(o->name)) continue;
        json_t *v = NULL;
        switch (o->kind) {
        case CLI_STR: {
            const char *s = *(const char **)o->dst;
            v = s ? json_string(s) : json_null();
            break;
        }
        case CLI_INT: v = json_integer(*(int *)o->dst); break;
        case CLI_I64: v = json_integer(*(int64_t *)o->dst); break;
        case CLI_F64: v = json_real(*(double *)o->dst); break;
        case CLI_BOOL: v = json_boolean(*(bool *)o->dst); break;
        default: continue;
        }
        json_object_set_new(j, o->name, v);
    }
    return cli_save_run_json("grpo", out, "grpo.json", j);
}

/* Fills every run flag from RUN/grpo.json; a run flag given on the
 * command line is refused (the run is defined by its start). Strings
 * point into *keep. */
static int load_settings(const char *run, int argc, char **argv, cli_opt *opts, json_t **keep)
{
    char path[4200]; /* for the messages below */
    snprintf(path, sizeof path, "%s/grpo.json", run);
    json_t *j = cli_load_run_json("grpo", run, "grpo.json");
    if (!j) return 1;
    *keep = j;
    for (cli_opt *o = opts; o->name; o++) {
        if (!run_flag(o->name)) continue;
        if (cli_given(argc, argv, o->name)) {
            fprintf(stderr, "kiln grpo: --%s cannot change on --resume (the run keeps the "
                            "settings of %s; only --steps and --threads may be given)\n",
                    o->name, path);
            return 1;
        }
        json_t *v = json_object_get(j, o->name);
        if (!v) continue;
        switch (o->kind) {
        case CLI_STR: *(const char **)o->dst = json_string_value(v); break;
        case CLI_INT: *(int *)o->dst = (int)json_integer_value(v); break;
        case CLI_I64: *(int64_t *)o->dst = (int64_t)json_integer_value(v); break;
        case CLI_F64: *(double *)o->dst = json_number_value(v); break;
        case CLI_BOOL: *(bool *)o->dst = json_is_true(v); break;
        default: break;
        }
    }
    return 0;
}

/* ---- checkpoints -------------------------------------------------------- */

static int rm_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *e;
    char p[4400];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    return rmdir(dir);
}

static kiln_status write_text(kiln_ctx *ctx, const char *path, const char *text)
{
    char tmp[4400];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    bool ok = f && fputs(text, f) >= 0;
    if (f) { /* all three run, whatever each returns */
        bool flushed = fflush(f) == 0, synced = fsync(fileno(f)) == 0, closed = fclose(f) == 0;
        ok = ok && flushed && synced && closed;
    }
    if (!ok || rename(tmp, path))
        return kiln_fail(ctx, KILN_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    return KILN_OK;
}

/* RUN/step_N: the model directory (+ tokenizer), optimizer.safetensors and
 * grpo_state.json, written under a temporary name and renamed; then
 * RUN/latest; then checkpoints beyond --keep-last are removed. */
static kiln_status save_checkpoint(grpo_run *r)
{
    kiln_ctx *ctx = r->ctx;
    char dir[4200], tmp[4300], p[4400];
    snprintf(dir, sizeof dir, "%s/step_%08lld", r->out, (long long)r->step);
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    rm_tree(tmp);
    kiln_status s = kiln_model_save(ctx, r->m, tmp);
    snprintf(p, sizeof p, "%s/tokenizer.json", tmp);
    if (!s) s = kiln_tokenizer_save(ctx, r->tok, p);
    if (!s && kiln_tokenizer_chat_template(r->tok)) s = kiln_tokenizer_save_chat_config(ctx, r->tok, tmp);
    snprintf(p, sizeof p, "%s/optimizer.safetensors", tmp);
    if (!s) s = kiln_adamw_save(ctx, r->opt, p);
    if (s) return s;
    json_t *j = json_pack("{s:I,s:I,s:[s,s,s,s]}", "step", (json_int_t)r->step, "opt_step",
                          (json_int_t)r->opt_step, "rng", "", "", "", "");
    for (int i = 0; j && i < 4; i++) {
        char u[32];
        snprintf(u, sizeof u, "%" PRIu64, r->rng.s[i]);
        json_array_set_new(json_object_get(j, "rng"), (size_t)i, json_string(u));
    }
    char *txt = j ? json_dumps(j, JSON_INDENT(2)) : NULL;
    json_decref(j);
    snprintf(p, sizeof p, "%s/grpo_state.json", tmp);
    s = txt ? write_text(ctx, p, txt) : kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    free(txt);
    if (s) return s;
    rm_tree(dir); /* a checkpoint of the same step from a run resumed earlier */
    if (rename(tmp, dir))
        return kiln_fail(ctx, KILN_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, dir,
                         strerror(errno));
    snprintf(p, sizeof p, "%s/latest", r->out);
    char name[64];
    snprintf(name, sizeof name, "step_%08lld\n", (long long)r->step);
    if ((s = write_text(ctx, p, name))) return s;
    if (r->a.keep_last > 0) {
        int64_t every = r->a.save_every > 0 ? r->a.save_every : 1;
        for (int64_t k = r->step - every * r->a.keep_last; k > 0; k -= every) {
            snprintf(p, sizeof p, "%s/step_%08lld", r->out, (long long)k);
            if (rm_tree(p) != 0) break;
        }
    }
    return KILN_OK;
}

static kiln_status load_state(grpo_run *r, const char *ckpt)
{
    char p[4400];
    snprintf(p, sizeof p, "%s/grpo_state.json", ckpt);
    json_error_t err;
    json_t *j = json_load_file(p, 0, &err);
    json_t *rng = j ? json_object_get(j, "rng") : NULL;
    if (!j || !json_is_integer(json_object_get(j, "step")) || json_array_size(rng) != 4) {
        json_decref(j);
        return kiln_fail(r->ctx, KILN_ERR_FORMAT, "%s: missing or malformed (a kiln grpo "
                         "checkpoint has step, opt_step and rng)", p);
    }
    r->step = json_integer_value(json_object_get(j, "step"));
    r->opt_step = json_integer_value(json_object_get(j, "opt_step"));
    for (int i = 0; i < 4; i++)
        r->rng.s[i] = strtoull(json_string_value(json_array_get(rng, (size_t)i)) ?: "0", NULL, 10);
    json_decref(j);
    return KILN_OK;
}

/* Keeps the lines of RUN/NAME whose "step" is <= step (a resumed run
 * writes the rest again). */
static void truncate_jsonl(const char *out, const char *name, int64_t step)
{
    char path[4200], tmp[4300], line[1 << 16];
    snprintf(path, sizeof path, "%s/%s", out, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(path, "r");
    if (!f) return;
    FILE *g = fopen(tmp, "w");
    if (!g) { fclose(f); return; }
    /* lines may be long (samples): read them whole */
    char *buf = NULL;
    size_t cap = 0;
    ssize_t n;
    (void)line;
    while ((n = getline(&buf, &cap, f)) > 0) {
        json_t *j = json_loads(buf, 0, NULL);
        json_int_t s = j ? json_integer_value(json_object_get(j, "step")) : INT64_MAX;
        json_decref(j);
        if (s <= step) fwrite(buf, 1, (size_t)n, g);
    }
    free(buf);
    fclose(f);
    if (fclose(g) == 0) rename(tmp, path);
}

/* ---- one step ----------------------------------------------------------- */

/* Prompt index of the step's j-th prompt: a seeded shuffle per epoch. */
static size_t prompt_at(grpo_run *r, int64_t pos)
{
    int64_t epoch = pos / (int64_t)r->n_prompts;
    if (epoch != r->perm_epoch) {
        kiln_rng g;
        kiln_rng_seed(&g, (uint64_t)r->a.seed * 0x9e3779b97f4a7c15ULL + (uint64_t)epoch);
        for (size_t i = 0; i < r->n_prompts; i++) r->perm[i] = i;
        for (size_t i = r->n_prompts; i > 1; i--) {
            size_t k = (size_t)kiln_rng_below(&g, i), t = r->perm[i - 1];
            r->perm[i - 1] = r->perm[k];
            r->perm[k] = t;
        }
        r->perm_epoch = epoch;
    }
    return r->keep[r->perm[pos % (int64_t)r->n_prompts]];
}

typedef struct step_buf {
    int R, T, cap;              /* rows, positions, ids per completion */
    size_t *pidx;               /* (P) prompt index */
    int32_t *ids;               /* (R, cap) completion ids */
    float *gen_logp;            /* (R, cap) their log-probs under the engine */
    int *n_ids;                 /* (R) */
    kiln_finish *finish;        /* (R) */
    char **text;                /* (R) completion text */
    float *reward, *terms, *adv; /* (R) (n_terms, R) (R) */
    int32_t *tokens, *targets;  /* (R, T) */
    float *old, *ref, *logp, *dlogp; /* (R, T) */
} step_buf;

static void step_buf_free(step_buf *b)
{
    if (b->text)
        for (int i = 0; i < b->R; i++) free(b->text[i]);
    free(b->pidx); free(b->ids); free(b->gen_logp); free(b->n_ids); free(b->finish); free(b->text);
    free(b->reward); free(b->terms); free(b->adv); free(b->tokens); free(b->targets);
    free(b->old); free(b->ref); free(b->logp); free(b->dlogp);
    memset(b, 0, sizeof *b);
}

typedef struct step_stats {
    double rollout_s, train_s, gen_tokens, train_tokens, loss, kl, clipped, tok, grad_norm, lr;
    double logp_diff_sum, logp_diff_max; /* |engine - training| log-probs of the samples */
    int truncated, cmd_failures, cmd_bad_lines;
} step_stats;

/* Samples the step's P*G completions on an engine built from the policy. */
static kiln_status rollout(grpo_run *r, step_buf *b, step_stats *ss)
{
    kiln_ctx *ctx = r->ctx;
    const int G = r->a.group, R = b->R, first = r->p_lo * G;
    const int all = r->a.batch_prompts * G;
    double t0 = kiln_time_now();
    /* every rank draws the whole step's seeds (row k of the step gets the
     * k-th) and uses its own rows': the completions do not depend on how
     * many ranks share the step, and the RNG state is the same on all */
    uint64_t *seed = malloc((size_t)all * sizeof *seed);
    if (!seed) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    for (int k = 0; k < all; k++) seed[k] = kiln_rng_u64(&r->rng);
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.n_slots = R;
    eo.n_ctx = r->n_ctx;
    eo.chunk = R > 64 ? R : 64;
    kiln_engine *e = NULL;
    kiln_gen **gens = calloc((size_t)R, sizeof *gens);
    const int32_t **pp = calloc((size_t)R, sizeof *pp);
    size_t *np = calloc((size_t)R, sizeof *np);
    if (!gens || !pp || !np) {
        free(gens); free(pp); free(np); free(seed);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    kiln_status s = kiln_engine_new(ctx, r->m, &eo, &e);
    for (int i = 0; i < R && !s; i++) {
        kiln_example ex;
        kiln_dataset_get(r->ds, b->pidx[i / G], &ex);
        pp[i] = ex.ids;
        np[i] = ex.n;
        kiln_gen_opts go = kiln_gen_opts_default();
        go.sampling.temperature = (float)r->a.temperature;
        go.sampling.top_p = (float)r->a.top_p;
        go.sampling.top_k = r->a.top_k;
        go.sampling.seed = seed[first + i];
        go.max_tokens = r->a.max_new;
        if (r->stop_id >= 0) {
            go.stop_ids = &r->stop_id;
            go.n_stop_ids = 1;
        }
        s = kiln_gen_new(ctx, r->tok, kiln_model_config(r->m), &go, ex.ids, ex.n, &gens[i]);
    }
    if (!s) s = kiln_generate_batch(ctx, e, R, pp, np, gens, b->ids, b->cap, b->n_ids,
                                     b->gen_logp, NULL);
    for (int i = 0; i < R && !s; i++) {
        size_t len;
        const char *t = kiln_gen_text(gens[i], &len);
        b->finish[i] = kiln_gen_finished(gens[i]);
        ss->truncated += b->finish[i] == KILN_FINISH_LENGTH;
        ss->gen_tokens += b->n_ids[i];
        if (!(b->text[i] = strndup(t, len))) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < R; i++) kiln_gen_free(gens[i]);
    kiln_engine_free(e); /* its copy of the weights goes before training */
    free(gens);
    free(pp);
    free(np);
    free(seed);
    ss->rollout_s = kiln_time_now() - t0;
    return s;
}

/* Rows for training: prompt + completion, targets on the completion. */
static void build_rows(grpo_run *r, step_buf *b)
{
    const int G = r->a.group;
    int T = 1;
    for (int i = 0; i < b->R; i++) {
        kiln_example ex;
        kiln_dataset_get(r->ds, b->pidx[i / G], &ex);
        int len = (int)ex.n + b->n_ids[i] - 1;
        T = len > T ? len : T;
    }
    b->T = T < r->n_ctx ? T : r->n_ctx;
    for (int i = 0; i < b->R; i++) {
        kiln_example ex;
        kiln_dataset_get(r->ds, b->pidx[i / G], &ex);
        int32_t *tk = b->tokens + (size_t)i * b->T, *tg = b->targets + (size_t)i * b->T;
        int np = (int)ex.n, n = np + b->n_ids[i];
        for (int t = 0; t < b->T; t++) {
            int32_t cur = t < np ? ex.ids[t] : t < n ? b->ids[(size_t)i * b->cap + t - np] : 0;
            tk[t] = t < n ? cur : kiln_tokenizer_eot(r->tok);
            tg[t] = t + 1 < n && t + 1 >= np ? b->ids[(size_t)i * b->cap + t + 1 - np] : -1;
        }
    }
}

/* The reference model's log-probs of the rows (beta > 0). */
static kiln_status ref_logprobs(grpo_run *r, step_buf *b)
{
    const int MB = r->a.micro_batch, V = kiln_model_config(r->m)->vocab_size;
    for (int o = 0; o < b->R; o += MB) {
        int B = b->R - o < MB ? b->R - o : MB;
        float *logits;
        kiln_status s = kiln_model_forward(r->ctx, r->ref, b->tokens + (size_t)o * b->T, B, b->T,
                                           &logits);
        if (!s) s = kiln_token_logprobs(r->ctx, logits, b->targets + (size_t)o * b->T,
                                        (int64_t)B * b->T, V, b->ref + (size_t)o * b->T);
        if (s) return s;
    }
    return KILN_OK;
}

/* The sampled tokens' log-probs as the engine computed them against the
 * training forward's (the same weights): a check that rollouts and
 * training see one policy (verl's rollout-vs-actor gap). Completion token
 * k of a row is its k-th learned position. */
static void logp_gap(const step_buf *b, int first, int B, step_stats *ss)
{
    for (int i = first; i < first + B; i++) {
        int k = 0;
        for (int t = 0; t < b->T; t++) {
            size_t q = (size_t)i * b->T + t;
            if (b->targets[q] < 0 || k >= b->n_ids[i]) continue;
            double d = fabs((double)b->logp[q] - b->gen_logp[(size_t)i * b->cap + k++]);
            ss->logp_diff_sum += d;
            ss->logp_diff_max = d > ss->logp_diff_max ? d : ss->logp_diff_max;
        }
    }
}

/* --updates optimizer steps on the batch. */
static kiln_status train(grpo_run *r, step_buf *b, step_stats *ss)
{
    kiln_ctx *ctx = r->ctx;
    const int MB = r->a.micro_batch, V = kiln_model_config(r->m)->vocab_size;
    double t0 = kiln_time_now();
    kiln_grpo_state st = {.opts = kiln_grpo_opts_default()};
    st.opts.clip_low = r->a.clip;
    st.opts.clip_high = r->a.clip_high >= 0 ? r->a.clip_high : r->a.clip;
    st.opts.beta = r->a.beta;
    st.opts.dr_grpo = r->a.dr_grpo;
    st.opts.max_new_tokens = r->a.max_new;
    kiln_objective obj = kiln_objective_grpo(&st);
    kiln_status s = KILN_OK;
    if (r->a.beta > 0 && (s = ref_logprobs(r, b))) return s;
    int64_t total = r->a.steps * r->a.updates;
    for (int u = 0; u < r->a.updates && !s; u++) {
        kiln_model_zero_grad(r->m);
        double W = 0;
        for (int o = 0; o < b->R && !s; o += MB) {
            int B = b->R - o < MB ? b->R - o : MB;
            kiln_objective_batch ob = {.B = B, .T = b->T, .V = V,
                                       .tokens = b->tokens + (size_t)o * b->T,
                                       .targets = b->targets + (size_t)o * b->T,
                                       .step = r->opt_step};
            s = obj.weigh(obj.user, ctx, &ob, &W);
        }
        /* the normaliser of the whole step (all ranks' rows): each rank's
         * gradient is then its share of the single-process gradient */
        if (!s) s = kiln_dist_sum_f64(ctx, r->dist, &W, 1);
        double ls = 0, ws = 0;
        for (int o = 0; o < b->R && !s; o += MB) {
            int B = b->R - o < MB ? b->R - o : MB;
            size_t off = (size_t)o * b->T;
            kiln_objective_batch ob = {.B = B, .T = b->T, .V = V, .tokens = b->tokens + off,
                                       .targets = b->targets + off, .step = r->opt_step};
            float *logits;
            if ((s = kiln_model_forward(ctx, r->m, ob.tokens, B, b->T, &logits))) break;
            st.adv = b->adv + o;
            st.old_logp = u == 0 ? NULL : b->old + off;
            st.ref_logp = r->a.beta > 0 ? b->ref + off : NULL;
            st.logp = b->logp + off;
            st.dlogp = b->dlogp + off;
            if ((s = obj.loss(obj.user, ctx, &ob, logits, (float)(1.0 / W), logits, &ls, &ws))) break;
            if ((s = kiln_model_backward(ctx, r->m, logits))) break;
            if (u == 0) {
                memcpy(b->old + off, b->logp + off, (size_t)B * b->T * sizeof(float));
                logp_gap(b, o, B, ss);
            }
            ss->train_tokens += (double)B * b->T;
        }
        if (s) break;
        if ((s = kiln_dist_sum_grads(ctx, r->dist, r->m)) || (s = kiln_dist_sum_f64(ctx, r->dist, &ls, 1)))
            break;
        double norm = kiln_l2_norm(kiln_model_grads(r->m), kiln_model_num_params(r->m));
        if (!isfinite(norm) || !isfinite(ls))
            return kiln_fail(ctx, KILN_ERR_NUMERIC, "step %lld: the loss or gradient is not "
                             "finite (loss %g, gradient norm %g); lower --lr",
                             (long long)r->step + 1, ls, norm);
        double lr = kiln_lr_at((kiln_schedule)kiln_schedule_parse(r->a.schedule), r->a.lr,
                               r->a.min_lr, r->a.warmup, total, r->opt_step);
        kiln_model_adamw_step(r->m, r->opt, kiln_model_grads(r->m), (float)lr,
                              kiln_clip_grad_coef(norm, r->a.grad_clip));
        r->opt_step++;
        ss->loss += ls / W / r->a.updates;
        ss->grad_norm += norm / r->a.updates;
        ss->lr = lr;
    }
    double tot[3] = {st.kl_sum, st.clipped, st.tokens};
    if (!s) s = kiln_dist_sum_f64(ctx, r->dist, tot, 3);
    st.kl_sum = tot[0], st.clipped = tot[1], st.tokens = tot[2];
    ss->kl = st.tokens ? st.kl_sum / st.tokens : 0;
    ss->clipped = st.tokens ? st.clipped / st.tokens : 0;
    ss->tok = st.tokens;
    ss->train_s = kiln_time_now() - t0;
    return s;
}

static void append_line(const char *out, const char *name, json_t *j)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", out, name);
    char *txt = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
    FILE *f = fopen(path, "a");
    if (f && txt) fprintf(f, "%s\n", txt);
    if (f) fclose(f);
    free(txt);
}

/* The step's metrics over all ranks' rows (rew, terms (n_terms, R) and
 * len of the R = batch-prompts x group rows, in the step's order); the
 * samples from this rank's first group (rank 0 holds the step's first). */
static void log_step(grpo_run *r, step_buf *b, const step_stats *ss, const double *rew,
                     const double *terms, const double *lens, int R)
{
    int nt = kiln_reward_n_terms(r->rw);
    double mean = 0, var = 0, len = 0, lmax = 0;
    for (int i = 0; i < R; i++) mean += rew[i], len += lens[i];
    mean /= R;
    len /= R;
    for (int i = 0; i < R; i++) {
        var += (rew[i] - mean) * (rew[i] - mean);
        lmax = lens[i] > lmax ? lens[i] : lmax;
    }
    double sd = R > 1 ? sqrt(var / (R - 1)) : 0;
    json_t *j = json_pack("{s:I,s:f,s:f,s:f}", "step", (json_int_t)r->step, "loss", ss->loss,
                          "reward_mean", mean, "reward_std", sd);
    for (int k = 0; k < nt; k++) {
        double m = 0;
        for (int i = 0; i < R; i++) m += terms[(size_t)k * R + i];
        char key[64];
        snprintf(key, sizeof key, "reward_%s", kiln_reward_term_name(r->rw, k));
        json_object_set_new(j, key, json_real(m / R));
    }
    json_object_set_new(j, "kl", json_real(ss->kl));
    json_object_set_new(j, "clip_frac", json_real(ss->clipped));
    json_object_set_new(j, "completion_len", json_real(len));
    json_object_set_new(j, "completion_len_max", json_real(lmax));
    json_object_set_new(j, "truncated_frac", json_real((double)ss->truncated / R));
    json_object_set_new(j, "rollout_tokens_per_s", json_real(ss->gen_tokens / ss->rollout_s));
    json_object_set_new(j, "train_tokens_per_s", json_real(ss->train_tokens / ss->train_s));
    json_object_set_new(j, "lr", json_real(ss->lr));
    json_object_set_new(j, "rollout_logp_diff", json_real(ss->gen_tokens ? ss->logp_diff_sum / ss->gen_tokens : 0));
    json_object_set_new(j, "rollout_logp_diff_max", json_real(ss->logp_diff_max));
    json_object_set_new(j, "grad_norm", json_real(ss->grad_norm));
    json_object_set_new(j, "reward_cmd_failures", json_integer(ss->cmd_failures));
    json_object_set_new(j, "reward_cmd_bad_lines", json_integer(ss->cmd_bad_lines));
    json_object_set_new(j, "world_size", json_integer(kiln_dist_world(r->dist)));
    append_line(r->out, "metrics.jsonl", j);
    json_decref(j);
    printf("step %lld/%lld | reward %.3f (std %.3f) | loss %+.4f | kl %.4f | clip %.3f | len "
           "%.1f | rollout %.0f tok/s | train %.0f tok/s\n",
           (long long)r->step, (long long)r->a.steps, mean, sd, ss->loss, ss->kl, ss->clipped,
           len, ss->gen_tokens / ss->rollout_s, ss->train_tokens / ss->train_s);
    fflush(stdout);
    if (r->a.sample_every > 0 && r->step % r->a.sample_every == 0) {
        kiln_example ex;
        kiln_dataset_get(r->ds, b->pidx[0], &ex);
        json_t *c = json_array();
        for (int i = 0; i < r->a.group; i++)
            json_array_append_new(c, json_pack("{s:s,s:f,s:s}", "text", b->text[i], "reward",
                                               (double)b->reward[i], "finish",
                                               kiln_finish_name(b->finish[i])));
        json_t *s = json_pack("{s:I,s:s,s:s?,s:o}", "step", (json_int_t)r->step, "prompt",
                              r->prompt_text[b->pidx[0]], "answer", ex.answer, "completions", c);
        append_line(r->out, "samples.jsonl", s);
        json_decref(s);
    }
}

/* Gathers the step's rows and counters from every rank (sums; times and
 * the largest gap: maxima), then rank 0 logs them. */
static kiln_status log_all(grpo_run *r, step_buf *b, step_stats *ss)
{
    const int G = r->a.group, R = r->a.batch_prompts * G, nt = kiln_reward_n_terms(r->rw);
    const int first = r->p_lo * G;
    double *all = calloc((size_t)R * (nt + 2), sizeof *all);
    if (!all) return kiln_fail(r->ctx, KILN_ERR_NOMEM, "out of memory");
    double *rew = all, *lens = all + R, *terms = all + 2 * (size_t)R;
    for (int i = 0; i < b->R; i++) {
        rew[first + i] = b->reward[i];
        lens[first + i] = b->n_ids[i];
        for (int k = 0; k < nt; k++) terms[(size_t)k * R + first + i] = b->terms[(size_t)k * b->R + i];
    }
    double sum[8] = {ss->gen_tokens, ss->train_tokens, ss->logp_diff_sum, ss->truncated,
                     ss->cmd_failures, ss->cmd_bad_lines}, mx[3] = {ss->rollout_s, ss->train_s,
                     ss->logp_diff_max};
    kiln_status s = kiln_dist_sum_f64(r->ctx, r->dist, all, (size_t)R * (nt + 2));
    if (!s) s = kiln_dist_sum_f64(r->ctx, r->dist, sum, 6);
    if (!s) s = kiln_dist_max_f64(r->ctx, r->dist, mx, 3);
    if (!s) {
        ss->gen_tokens = sum[0], ss->train_tokens = sum[1], ss->logp_diff_sum = sum[2];
        ss->truncated = (int)sum[3], ss->cmd_failures = (int)sum[4], ss->cmd_bad_lines = (int)sum[5];
        ss->rollout_s = mx[0], ss->train_s = mx[1], ss->logp_diff_max = mx[2];
        if (r->root) log_step(r, b, ss, rew, terms, lens, R);
    }
    free(all);
    return s;
}

/* Completions of the --eval-prompts (greedy, or sampled at
 * --eval-temperature), scored with the run's reward:
 * a line {"step", "eval_reward", "eval_<term>"..., "eval_prompts"} in
 * metrics.jsonl. No randomness: the rollout RNG is untouched. Under mpirun
 * each rank completes and scores its share of the prompts (a prompt's seed
 * is its index's), rank 0 writes the means over all of them. */
static kiln_status evaluate(grpo_run *r)
{
    kiln_ctx *ctx = r->ctx;
    size_t n = kiln_dataset_count(r->eval_ds);
    int nt = kiln_reward_n_terms(r->rw), S = n < 64 ? (int)n : 64, cap = r->a.max_new;
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.n_slots = S;
    eo.n_ctx = r->n_ctx;
    eo.chunk = S > 64 ? S : 64;
    kiln_engine *e = NULL;
    char **text = calloc(n, sizeof *text), **ptext = calloc(n, sizeof *ptext);
    const char **ans = calloc(n, sizeof *ans);
    float *rew = calloc(n, sizeof *rew), *terms = calloc(n * (size_t)nt, sizeof *terms);
    int32_t *ids = malloc((size_t)S * cap * sizeof *ids);
    int *n_ids = calloc((size_t)S, sizeof *n_ids);
    kiln_gen **gens = calloc((size_t)S, sizeof *gens);
    const int32_t **pp = calloc((size_t)S, sizeof *pp);
    size_t *np = calloc((size_t)S, sizeof *np), used = 0, skipped = 0;
    size_t *gi = calloc(n + 1, sizeof *gi); /* dataset index of each used prompt */
    const int rank = kiln_dist_rank(r->dist), world = kiln_dist_world(r->dist);
    const size_t lo = n * (size_t)rank / (size_t)world, hi = n * (size_t)(rank + 1) / (size_t)world;
    kiln_status s = text && ptext && ans && rew && terms && ids && n_ids && gens && pp && np && gi
                        ? kiln_engine_new(ctx, r->m, &eo, &e)
                        : kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    double t0 = kiln_time_now();
    for (size_t i = lo; i < hi && !s;) {
        int k = 0;
        for (; k < S && i < hi && !s; i++) {
            kiln_example ex;
            kiln_dataset_get(r->eval_ds, i, &ex);
            if (ex.n > (size_t)r->n_ctx - 1) { skipped++; continue; }
            kiln_gen_opts go = kiln_gen_opts_default();
            /* sampled evaluations draw from seeds of their own (the run's
             * seed, the step, the prompt): the rollout RNG is untouched */
            go.sampling.temperature = (float)r->a.eval_temperature;
            go.sampling.top_p = (float)r->a.top_p;
            go.sampling.top_k = r->a.top_k;
            go.sampling.seed = (uint64_t)r->a.seed * 0x9e3779b97f4a7c15ULL ^
                               ((uint64_t)r->step << 32) ^ (uint64_t)i;
            go.max_tokens = cap;
            if (r->stop_id >= 0) {
                go.stop_ids = &r->stop_id;
                go.n_stop_ids = 1;
            }
            size_t len;
            pp[k] = ex.ids;
            np[k] = ex.n;
            ans[used + k] = ex.answer;
            gi[used + k] = i;
            s = kiln_tokenizer_decode(ctx, r->tok, ex.ids, ex.n, &ptext[used + k], &len);
            if (!s) s = kiln_gen_new(ctx, r->tok, kiln_model_config(r->m), &go, ex.ids, ex.n, &gens[k]);
            k++;
        }
        if (!s && k) s = kiln_generate_batch(ctx, e, k, pp, np, gens, ids, cap, n_ids, NULL, NULL);
        for (int j = 0; j < k; j++) {
            size_t len;
            const char *t = gens[j] ? kiln_gen_text(gens[j], &len) : "";
            if (!s && !(text[used + j] = strndup(t, gens[j] ? len : 0)))
                s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            kiln_gen_free(gens[j]);
            gens[j] = NULL;
        }
        used += (size_t)k;
    }
    kiln_engine_free(e);
    kiln_reward_report rep = {0};
    if (!s && used)
        s = kiln_reward_score(ctx, r->rw, (int)used, (const char *const *)ptext,
                              (const char *const *)text, ans, rew, terms, &rep);
    /* every rank's results at their dataset index (rewards, a mask, the
     * terms), so the means are summed in the order of one process */
    double *all = s ? NULL : calloc(n * (size_t)(nt + 2) + 1, sizeof *all);
    if (!s && !all) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!s) {
        for (size_t u = 0; u < used; u++) {
            all[gi[u]] = rew[u];
            all[n + gi[u]] = 1;
            for (int k = 0; k < nt; k++) all[(size_t)(k + 2) * n + gi[u]] = terms[(size_t)k * used + u];
        }
        all[n * (size_t)(nt + 2)] = (double)skipped;
        s = kiln_dist_sum_f64(ctx, r->dist, all, n * (size_t)(nt + 2) + 1);
    }
    size_t n_used = 0;
    for (size_t i = 0; !s && i < n; i++) n_used += all[n + i] > 0;
    if (!s && n_used && r->root) {
        double m = 0;
        for (size_t i = 0; i < n; i++) m += all[i];
        json_t *j = json_pack("{s:I,s:f}", "step", (json_int_t)r->step, "eval_reward", m / n_used);
        printf("eval at step %lld: reward %.4f", (long long)r->step, m / n_used);
        for (int k = 0; k < nt; k++) {
            double mk = 0;
            for (size_t i = 0; i < n; i++) mk += all[(size_t)(k + 2) * n + i];
            char key[64];
            snprintf(key, sizeof key, "eval_%s", kiln_reward_term_name(r->rw, k));
            json_object_set_new(j, key, json_real(mk / n_used));
            printf(", %s %.4f", kiln_reward_term_name(r->rw, k), mk / n_used);
        }
        json_object_set_new(j, "eval_prompts", json_integer((json_int_t)n_used));
        json_object_set_new(j, "eval_temperature", json_real(r->a.eval_temperature));
        append_line(r->out, "metrics.jsonl", j);
        json_decref(j);
        printf(" (%zu prompts, temperature %g, %.0f too long; %.1f s)\n", n_used,
               r->a.eval_temperature, all[n * (size_t)(nt + 2)], kiln_time_now() - t0);
        fflush(stdout);
    }
    free(all);
    free(gi);
    for (size_t i = 0; i < n; i++) {
        if (text) free(text[i]);
        if (ptext) free(ptext[i]);
    }
    free(text); free(ptext); free(ans); free(rew); free(terms); free(ids); free(n_ids);
    free(gens); free(pp); free(np);
    return s;
}

static kiln_status grpo_step(grpo_run *r, step_buf *b)
{
    const int P = r->p_n, G = r->a.group, R = P * G;
    step_stats ss = {0};
    for (int j = 0; j < P; j++)
        b->pidx[j] = prompt_at(r, r->step * r->a.batch_prompts + r->p_lo + j);
    for (int i = 0; i < R; i++) {
        free(b->text[i]);
        b->text[i] = NULL;
    }
    kiln_status s = rollout(r, b, &ss);
    if (s) return s;
    const char **pr = malloc((size_t)R * sizeof *pr), **an = malloc((size_t)R * sizeof *an);
    if (!pr || !an) s = kiln_fail(r->ctx, KILN_ERR_NOMEM, "out of memory");
    for (int i = 0; i < R && !s; i++) {
        kiln_example ex;
        kiln_dataset_get(r->ds, b->pidx[i / G], &ex);
        pr[i] = r->prompt_text[b->pidx[i / G]];
        an[i] = ex.answer;
    }
    kiln_reward_report rep;
    if (!s)
        s = kiln_reward_score(r->ctx, r->rw, R, pr, (const char *const *)b->text, an, b->reward,
                              b->terms, &rep);
    free(pr);
    free(an);
    if (s) return s;
    ss.cmd_failures = rep.cmd_failures;
    ss.cmd_bad_lines = rep.cmd_bad_lines;
    if ((s = kiln_grpo_advantages(r->ctx, b->reward, P, G, !r->a.dr_grpo, b->adv))) return s;
    build_rows(r, b);
    if ((s = train(r, b, &ss))) return s;
    r->step++;
    return log_all(r, b, &ss);
}

/* ---- setup -------------------------------------------------------------- */

static int check_args(const grpo_args *a)
{
    const char *bad = a->group < 2                    ? "--group must be at least 2 (advantages "
                                                        "compare completions within a group)"
                      : a->max_new < 1                ? "--max-new-tokens must be positive"
                      : a->batch_prompts < 1          ? "--batch-prompts must be positive"
                      : a->micro_batch < 1            ? "--micro-batch must be positive"
                      : a->updates < 1                ? "--updates must be positive"
                      : a->steps < 1                  ? "--steps must be positive"
                      : !(a->temperature > 0)         ? "--temperature must be > 0 (the group "
                                                        "needs different completions)"
                      : !(a->lr > 0)                  ? "--lr must be positive"
                      : a->batch_prompts * a->group > 4096 ? "--batch-prompts x --group must be "
                                                             "at most 4096 (engine slots)"
                      : kiln_schedule_parse(a->schedule) < 0 ? "--schedule must be cosine, linear "
                                                               "or constant"
                      : kiln_precision_parse(a->precision) < 0 ? "--precision must be fp32, bf16, "
                                                                 "fp16 or auto"
                                                        : NULL;
    if (bad) fprintf(stderr, "kiln grpo: %s\n", bad);
    return bad ? 2 : 0;
}

static kiln_status setup(grpo_run *r, const char *model_dir, const char *ckpt)
{
    kiln_ctx *ctx = r->ctx;
    const grpo_args *a = &r->a;
    kiln_status s;
    /* the policy: the checkpoint on resume, else the model */
    if ((s = kiln_model_load(ctx, ckpt ? ckpt : model_dir, &r->m))) return s;
    kiln_precision p = (kiln_precision)kiln_precision_parse(a->precision);
    if ((s = kiln_model_set_precision(ctx, r->m, p))) return s;
    if ((s = kiln_tokenizer_load(ctx, a->tokenizer ? a->tokenizer : model_dir, &r->tok))) {
        kiln_fail(ctx, s, "--tokenizer: %s", kiln_errmsg(ctx));
        return s;
    }
    const kiln_config *cfg = kiln_model_config(r->m);
    r->n_ctx = cfg->n_ctx;
    kiln_dataset_opts dopt = kiln_dataset_opts_default();
    dopt.skip_bad = a->skip_bad;
    if ((s = kiln_dataset_load(ctx, r->tok, a->prompts, KILN_DATASET_PROMPTS, &dopt, &r->ds)))
        return s;
    kiln_dataset_stats st;
    kiln_dataset_get_stats(r->ds, &st);
    size_t n_all = kiln_dataset_count(r->ds);
    r->keep = malloc((n_all + 1) * sizeof *r->keep);
    r->prompt_text = calloc(n_all + 1, sizeof *r->prompt_text);
    r->perm = malloc((n_all + 1) * sizeof *r->perm);
    r->perm_epoch = -1;
    if (!r->prompt_text || !r->perm || !r->keep) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    /* a prompt needs room for at least one new token */
    int64_t dropped = 0;
    for (size_t i = 0; i < n_all; i++) {
        kiln_example ex;
        kiln_dataset_get(r->ds, i, &ex);
        if (ex.n > (size_t)r->n_ctx - 1) {
            if (dropped++ < 5 && r->root) /* every rank drops the same ones */
                fprintf(stderr, "kiln grpo: %s:%lld: the prompt is %zu tokens; the context of "
                                "%d leaves no room to complete it: dropped\n",
                        a->prompts, (long long)ex.line, ex.n, r->n_ctx);
            continue;
        }
        r->keep[r->n_prompts++] = i;
        size_t len;
        if ((s = kiln_tokenizer_decode(ctx, r->tok, ex.ids, ex.n, &r->prompt_text[i], &len)))
            return s;
    }
    printf("%s: %zu prompts (%lld lines, %lld bad, %lld longer than the context of %d and "
           "dropped)\n", a->prompts, r->n_prompts, (long long)st.lines,
           (long long)st.bad_lines, (long long)dropped, r->n_ctx);
    if (r->n_prompts == 0)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: no prompt fits the model's context of %d",
                         a->prompts, r->n_ctx);
    if (a->eval_prompts) {
        kiln_dataset_opts eopt = kiln_dataset_opts_default();
        if ((s = kiln_dataset_load(ctx, r->tok, a->eval_prompts, KILN_DATASET_PROMPTS, &eopt,
                                   &r->eval_ds))) {
            kiln_fail(ctx, s, "--eval-prompts: %s", kiln_errmsg(ctx));
            return s;
        }
    }
    /* a chat turn ends with its own token when the template has one */
    int sid = kiln_chat_stop_id(r->tok);
    r->stop_id = sid >= 0 && sid != kiln_tokenizer_eot(r->tok) ? sid : -1;
    kiln_reward_opts ro = kiln_reward_opts_default();
    ro.spec = a->reward;
    ro.cmd = a->reward_cmd;
    ro.regex = a->regex;
    ro.tolerance = a->tolerance;
    ro.cmd_timeout = a->cmd_timeout;
    if ((s = kiln_reward_new(ctx, &ro, &r->rw))) return s;
    kiln_grpo_opts go = kiln_grpo_opts_default();
    go.clip_low = a->clip;
    go.clip_high = a->clip_high >= 0 ? a->clip_high : a->clip;
    go.beta = a->beta;
    go.dr_grpo = a->dr_grpo;
    go.max_new_tokens = a->max_new;
    if ((s = kiln_grpo_opts_validate(ctx, &go))) return s;
    if (a->beta > 0) { /* the reference: the initial weights, frozen */
        if ((s = kiln_model_load(ctx, model_dir, &r->ref))) return s;
        if ((s = kiln_model_set_precision(ctx, r->ref, p))) return s;
        if ((s = kiln_model_set_trainable(ctx, r->ref, "*", false, NULL))) return s;
    }
    int longest = 0;
    for (size_t i = 0; i < r->n_prompts; i++) {
        kiln_example ex;
        kiln_dataset_get(r->ds, r->keep[i], &ex);
        longest = (int)ex.n > longest ? (int)ex.n : longest;
    }
    r->T_max = longest + a->max_new - 1 < r->n_ctx ? longest + a->max_new - 1 : r->n_ctx;
    int MB = a->micro_batch;
    if ((s = kiln_model_prepare(ctx, r->m, MB, r->T_max))) return s;
    if (r->ref && (s = kiln_model_prepare(ctx, r->ref, MB, r->T_max))) return s;
    kiln_adamw_opts ao = kiln_adamw_opts_default();
    ao.beta1 = (float)a->beta1;
    ao.beta2 = (float)a->beta2;
    ao.eps = (float)a->eps;
    ao.weight_decay = (float)a->weight_decay;
    if ((s = kiln_adamw_new_for_model(ctx, r->m, &ao, &r->opt))) return s;
    kiln_rng_seed(&r->rng, (uint64_t)a->seed);
    if (ckpt) {
        char p2[4400];
        snprintf(p2, sizeof p2, "%s/optimizer.safetensors", ckpt);
        if ((s = kiln_adamw_load(ctx, r->opt, p2)) || (s = load_state(r, ckpt))) return s;
    }
    return KILN_OK;
}

static kiln_status alloc_step(grpo_run *r, step_buf *b)
{
    const int R = r->p_n * r->a.group, nt = kiln_reward_n_terms(r->rw);
    size_t RT = (size_t)R * r->T_max;
    b->R = R;
    b->cap = r->a.max_new;
    b->pidx = calloc((size_t)r->p_n, sizeof *b->pidx);
    b->ids = calloc((size_t)R * b->cap, sizeof *b->ids);
    b->gen_logp = calloc((size_t)R * b->cap, sizeof *b->gen_logp);
    b->n_ids = calloc((size_t)R, sizeof *b->n_ids);
    b->finish = calloc((size_t)R, sizeof *b->finish);
    b->text = calloc((size_t)R, sizeof *b->text);
    b->reward = calloc((size_t)R, sizeof *b->reward);
    b->terms = calloc((size_t)R * nt, sizeof *b->terms);
    b->adv = calloc((size_t)R, sizeof *b->adv);
    b->tokens = calloc(RT, sizeof *b->tokens);
    b->targets = calloc(RT, sizeof *b->targets);
    b->old = calloc(RT, sizeof *b->old);
    b->ref = calloc(RT, sizeof *b->ref);
    b->logp = calloc(RT, sizeof *b->logp);
    b->dlogp = calloc(RT, sizeof *b->dlogp);
    if (!b->pidx || !b->ids || !b->gen_logp || !b->n_ids || !b->finish || !b->text || !b->reward || !b->terms ||
        !b->adv || !b->tokens || !b->targets || !b->old || !b->ref || !b->logp || !b->dlogp)
        return kiln_fail(r->ctx, KILN_ERR_NOMEM, "out of memory for %d rollouts of %d positions",
                         R, r->T_max);
    return KILN_OK;
}

static void run_free(grpo_run *r)
{
    if (r->prompt_text && r->ds)
        for (size_t i = 0; i < kiln_dataset_count(r->ds); i++) free(r->prompt_text[i]);
    free(r->keep);
    free(r->prompt_text);
    free(r->perm);
    kiln_reward_free(r->rw);
    kiln_adamw_free(r->opt);
    kiln_model_free(r->m);
    kiln_model_free(r->ref);
    kiln_dataset_free(r->ds);
    kiln_dataset_free(r->eval_ds);
    kiln_tokenizer_free(r->tok);
}

int cmd_grpo(int argc, char **argv)
{
    grpo_args a = {.reward = "exact", .precision = "fp32", .schedule = "constant", .group = 8,
                   .max_new = 64, .batch_prompts = 4, .micro_batch = 8, .updates = 1,
                   .keep_last = 2, .sample_every = 1, .temperature = 1.0, .top_p = 1.0,
                   .beta = 0.0, .clip = 0.2, .clip_high = -1, .lr = 1e-6, .weight_decay = 0,
                   .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .grad_clip = 1.0, .tolerance = 1e-6,
                   .cmd_timeout = 60, .steps = 100, .seed = 1, .save_every = 50};
    const char *out = NULL, *resume = NULL;
    int threads = 0;
    double dist_timeout = 300;
    cli_opt opts[] = {
        {"model", CLI_STR, &a.model, "model directory (or run directory: its newest checkpoint) to train; also the reference of --beta", false},
        {"tokenizer", CLI_STR, &a.tokenizer, "tokenizer.json, a directory, or \"bytes\" [the model directory's]", false},
        {"prompts", CLI_STR, &a.prompts, "JSONL: {\"prompt\": string or messages, \"answer\": string or number} per line; prompts longer than the context are counted and dropped", false},
        {"out", CLI_STR, &out, "run directory (metrics.jsonl, samples.jsonl, step_* checkpoints)", false},
        {"resume", CLI_OPTSTR, &resume, "continue a run: a run directory or a step_* checkpoint [--out]", false},
        {"eval-prompts", CLI_STR, &a.eval_prompts, "held-out prompts (same JSONL): completions (greedy, or at --eval-temperature) scored with --reward at the start, every --eval-every steps and at the end (eval_* in metrics.jsonl)", false},
        {"eval-every", CLI_I64, &a.eval_every, "steps between evaluations of --eval-prompts, 0 = start and end only [0]", false},
        {"eval-temperature", CLI_F64, &a.eval_temperature, "sampling temperature of the evaluations (0 = greedy; above 0 each prompt is sampled once, with --top-p/--top-k, from seeds of its own) [0]", false},
        {"group", CLI_INT, &a.group, "completions sampled per prompt, >= 2 [8]", false},
        {"batch-prompts", CLI_INT, &a.batch_prompts, "prompts per step (rows = batch-prompts x group) [4]", false},
        {"micro-batch", CLI_INT, &a.micro_batch, "rows per forward/backward (gradients accumulate over the step's rows) [8]", false},
        {"max-new-tokens", CLI_INT, &a.max_new, "tokens sampled per completion at most [64]", false},
        {"temperature", CLI_F64, &a.temperature, "sampling temperature of the rollouts, > 0 [1]", false},
        {"top-p", CLI_F64, &a.top_p, "nucleus sampling of the rollouts, (0, 1] [1]", false},
        {"top-k", CLI_INT, &a.top_k, "top-k sampling of the rollouts, 0 = off [0]", false},
        {"reward", CLI_STR, &a.reward, "weighted sum NAME[:W],... of exact (answer after #### or in \\boxed{}), numeric (--tolerance), regex (--regex), cmd (--reward-cmd) [exact]", false},
        {"reward-cmd", CLI_STR, &a.reward_cmd, "program (sh -c) reading JSONL {prompt,completion,answer} on stdin and printing one number per line; adds the term cmd (weight 1) when --reward does not name it. Crash, timeout or a wrong line count: 0 for that step's completions; a line that is not a number: 0 for its completion (both counted in metrics.jsonl)", false},
        {"reward-timeout", CLI_F64, &a.cmd_timeout, "seconds the reward command may take per step before it is killed [60]", false},
        {"tolerance", CLI_F64, &a.tolerance, "numeric reward: |x - answer| <= tolerance x max(1, |answer|) [1e-6]", false},
        {"regex", CLI_STR, &a.regex, "regex reward's PCRE2 pattern, searched in the completion [####\\s*-?[0-9][0-9,.]*\\s*$]", false},
        {"beta", CLI_F64, &a.beta, "KL penalty to the reference model (k3 estimator); 0 = no reference model [0]", false},
        {"clip", CLI_F64, &a.clip, "ratio clipping epsilon: ratio in [1 - clip, 1 + clip-high] [0.2]", false},
        {"clip-high", CLI_F64, &a.clip_high, "upper clipping epsilon (DAPO) [--clip]", false},
        {"updates", CLI_INT, &a.updates, "optimizer steps per rollout batch (ratio clipping against the rollout policy) [1]", false},
        {"dr-grpo", CLI_BOOL, &a.dr_grpo, "Dr. GRPO: advantages not divided by the group's std; loss summed over tokens / (rows x max-new-tokens)", false},
        {"steps", CLI_I64, &a.steps, "GRPO steps (rollout batches) [100]", false},
        {"lr", CLI_F64, &a.lr, "peak learning rate [1e-6]", false},
        {"min-lr", CLI_F64, &a.min_lr, "final learning rate of cosine/linear decay [0]", false},
        {"warmup", CLI_I64, &a.warmup, "linear warmup (optimizer steps) [0]", false},
        {"schedule", CLI_STR, &a.schedule, "cosine | linear | constant [constant]", false},
        {"weight-decay", CLI_F64, &a.weight_decay, "AdamW decoupled weight decay on matrices [0]", false},
        {"beta1", CLI_F64, &a.beta1, "AdamW beta1 [0.9]", false},
        {"beta2", CLI_F64, &a.beta2, "AdamW beta2 [0.99]", false},
        {"eps", CLI_F64, &a.eps, "AdamW epsilon [1e-8]", false},
        {"grad-clip", CLI_F64, &a.grad_clip, "max global gradient norm, 0 = off [1.0]", false},
        {"precision", CLI_STR, &a.precision, "fp32 | bf16 | fp16 | auto: the training products (rollouts are fp32) [fp32]", false},
        {"seed", CLI_I64, &a.seed, "seed of the prompt order and the rollouts' sampling [1]", false},
        {"save-every", CLI_I64, &a.save_every, "steps between checkpoints (and one at the end) [50]", false},
        {"keep-last", CLI_INT, &a.keep_last, "checkpoints kept, 0 = all [2]", false},
        {"sample-every", CLI_INT, &a.sample_every, "steps between the completions of a group written to samples.jsonl, 0 = never [1]", false},
        {"skip-bad", CLI_BOOL, &a.skip_bad, "skip malformed prompt lines (each is still reported) instead of failing", false},
        {"threads", CLI_INT, &threads, "threads, 0 = all cores [0]", false},
        {"dist-timeout", CLI_F64, &dist_timeout, "under mpirun: seconds a collective may take before the job is aborted (rank 0 writing a checkpoint included) [300]", false},
        {NULL, 0, NULL, NULL, false}};
    int rc = cli_parse("grpo", "grpo --model DIR --prompts FILE --out DIR [options]",
                       "Group relative policy optimisation with verifiable rewards: per step,\n"
                       "--batch-prompts prompts are each completed --group times by the\n"
                       "inference engine on the current weights, the completions are scored\n"
                       "(--reward, --reward-cmd), advantages are normalised within each group,\n"
                       "and the policy takes --updates steps of the clipped surrogate (+ --beta\n"
                       "x KL to the initial model). Writes RUN/metrics.jsonl (reward, KL, clip\n"
                       "fraction, lengths, rollout and training tokens/s), RUN/samples.jsonl\n"
                       "and RUN/step_*/ checkpoints (model directories) that --resume continues\n"
                       "exactly. Under mpirun -np N each rank rolls out its share of the\n"
                       "step's prompts and the gradients are summed: the same update as one\n"
                       "process. docs/alignment.md.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    grpo_run r = {.ctx = ctx};
    step_buf b = {0};
    json_t *saved = NULL;
    int ret = 2;
    char ckpt[1024], run_dir[1024], model_dir[4200], eabs[PATH_MAX];
    const char *ck = NULL;
    kiln_status s = KILN_OK;
    int64_t steps_given = a.steps;
    if (resume) {
        const char *where = *resume ? resume : out;
        if (!where) {
            fprintf(stderr, "kiln grpo: --resume needs a directory (or --out RUN)\n");
            goto done;
        }
        if ((s = kiln_checkpoint_resolve(ctx, where, ckpt, sizeof ckpt))) {
            char p[1100];
            snprintf(p, sizeof p, "%s/grpo_state.json", where);
            if (access(p, F_OK) == 0) snprintf(ckpt, sizeof ckpt, "%s", where), s = KILN_OK;
            else {
                ret = cli_fail(ctx, "grpo", s);
                goto done;
            }
        }
        snprintf(run_dir, sizeof run_dir, "%s", ckpt);
        char *sl = strrchr(run_dir, '/');
        if (sl) *sl = 0;
        else snprintf(run_dir, sizeof run_dir, ".");
        if (load_settings(run_dir, argc, argv, opts, &saved)) goto done;
        if (cli_given(argc, argv, "steps")) a.steps = steps_given;
        out = out ? out : run_dir;
        ck = ckpt;
    } else if (!a.model || !*a.model || !a.prompts || !*a.prompts || !out || !*out) {
        fprintf(stderr, "kiln grpo: --model, --prompts and --out are required (or --resume "
                        "RUN_DIR; see kiln grpo --help)\n");
        goto done;
    }
    if ((ret = check_args(&a))) goto done;
    ret = 1;
    kiln_set_threads(ctx, threads);
    kiln_dist_opts dopt = kiln_dist_opts_default();
    dopt.timeout_s = dist_timeout;
    if ((s = kiln_dist_new(ctx, &dopt, &r.dist))) goto fail;
    {
        int rank = kiln_dist_rank(r.dist), world = kiln_dist_world(r.dist);
        if (a.batch_prompts < world) {
            fprintf(stderr, "kiln grpo: --batch-prompts %d is less than the %d ranks of the job: "
                            "each rank rolls out whole groups; use at least %d prompts per step\n",
                    a.batch_prompts, world, world);
            goto done;
        }
        /* rank k: prompts [k P / N, (k + 1) P / N) of each step, whole groups */
        r.p_lo = (int)((int64_t)rank * a.batch_prompts / world);
        r.p_n = (int)((int64_t)(rank + 1) * a.batch_prompts / world) - r.p_lo;
        r.root = rank == 0;
        /* one voice: the other ranks' progress lines would repeat rank 0's */
        if (!r.root && !freopen("/dev/null", "w", stdout)) {
            fprintf(stderr, "kiln grpo: rank %d: cannot silence stdout\n", rank);
            goto done;
        }
    }
    if ((s = cli_model_dir(ctx, a.model, model_dir, sizeof model_dir))) {
        kiln_fail(ctx, s, "--model: %s", kiln_errmsg(ctx));
        goto fail;
    }
    if (!resume) {
        if (r.root && mkdir(out, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "kiln grpo: --out: cannot create '%s': %s\n", out, strerror(errno));
            goto done;
        }
        char lp[1100];
        snprintf(lp, sizeof lp, "%s/latest", out);
        if (access(lp, F_OK) == 0) {
            fprintf(stderr, "kiln grpo: '%s' already holds checkpoints of a run; continue it with "
                            "--resume %s, or choose another --out\n", out, out);
            goto done;
        }
        char abs[PATH_MAX], pabs[PATH_MAX];
        if (realpath(model_dir, abs)) a.model = abs; /* a resume may start elsewhere */
        if (realpath(a.prompts, pabs)) a.prompts = pabs;
        if (a.eval_prompts && realpath(a.eval_prompts, eabs)) a.eval_prompts = eabs;
        if (r.root && save_settings(out, opts)) goto done;
        snprintf(model_dir, sizeof model_dir, "%s", a.model);
        a.model = model_dir;
        a.prompts = strdup(a.prompts);
        char mp[1100];
        snprintf(mp, sizeof mp, "%s/metrics.jsonl", out);
        if (r.root) unlink(mp);
        snprintf(mp, sizeof mp, "%s/samples.jsonl", out);
        if (r.root) unlink(mp);
    } else
        a.prompts = strdup(a.prompts);
    r.a = a;
    r.out = out;
    if ((s = setup(&r, model_dir, ck))) goto fail;
    if (ck && r.root) {
        truncate_jsonl(out, "metrics.jsonl", r.step);
        truncate_jsonl(out, "samples.jsonl", r.step);
        printf("resumed from %s at step %lld\n", ck, (long long)r.step);
    }
    if ((s = alloc_step(&r, &b))) goto fail;
    printf("grpo: %d prompts x %d completions per step, %lld steps, %d update%s each; "
           "reward %s%s%s; beta %g, clip %g%s\n",
           a.batch_prompts, a.group, (long long)a.steps, a.updates, a.updates == 1 ? "" : "s",
           a.reward, a.reward_cmd ? " + cmd " : "", a.reward_cmd ? a.reward_cmd : "", a.beta,
           a.clip, a.dr_grpo ? ", dr-grpo" : "");
    if (kiln_dist_world(r.dist) > 1)
        printf("mpi: %d ranks, %d or %d prompts (x %d completions) each per step\n",
               kiln_dist_world(r.dist), a.batch_prompts / kiln_dist_world(r.dist),
               (a.batch_prompts + kiln_dist_world(r.dist) - 1) / kiln_dist_world(r.dist), a.group);
    fflush(stdout);
    /* checkpoints are rank 0's; the others wait at the next step's first
     * collective (--dist-timeout bounds the wait) */
    if (r.eval_ds && r.step == 0 && (s = evaluate(&r))) goto fail;
    while (r.step < a.steps) {
        if ((s = grpo_step(&r, &b))) goto fail;
        if (r.eval_ds && ((a.eval_every > 0 && r.step % a.eval_every == 0) || r.step == a.steps) &&
            (s = evaluate(&r)))
            goto fail;
        if (r.root && ((a.save_every > 0 && r.step % a.save_every == 0) || r.step == a.steps))
            if ((s = save_checkpoint(&r))) goto fail;
    }
    printf("done: step %lld\ncheckpoint: %s/step_%08lld\nmetrics:    %s/metrics.jsonl\n",
           (long long)r.step, out, (long long)r.step, out);
    ret = 0;
    goto done;
fail:
    ret = cli_fail(ctx, "grpo", s);
done:
    step_buf_free(&b);
    if (r.a.prompts) free((char *)r.a.prompts);
    run_free(&r);
    json_decref(saved);
    /* after an error this rank leaves without MPI_Finalize (the others may be
     * inside a collective); its non-zero exit ends the job */
    if (ret) kiln_dist_abandon(r.dist);
    else kiln_dist_free(r.dist);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return ret;
}
