/*
 * bench_spec.c — speculative decoding at batch 1: greedy decode tokens/s
 * of the target alone (kiln_generate) and with the draft proposing K
 * tokens per target step (kiln_generate_spec), in the same process, on
 * the same prompts, alternating the two runs round by round so both see
 * the same load on a shared machine; prints the best round of each, their
 * ratio, the acceptance rate, tokens per target step, and whether the
 * tokens were identical (they must be: greedy). Before that, the
 * target's step cost for T = 1..max(K + 1, 8) tokens of one sequence
 * (alone, and with three draft steps before each try, as in a round) and
 * the draft's 1-token step; after it, where the last round's time went.
 *
 *   bench_spec TARGET DRAFT [K] [TOKENS] [THREADS] [ROUNDS] [fp32|bf16]
 *
 * TARGET and DRAFT are model directories (or run directories: their
 * latest checkpoint) sharing a tokenizer; K [4], TOKENS generated per
 * prompt [128], THREADS [1], ROUNDS [3], the weights of both engines
 * [fp32].
 */
#include "kiln.h"
#include "bench_cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *prompts[] = {"The meaning of life is", "A man walks into a bar",
                                "Q: Why did the chicken cross the road?\nA:",
                                "You will be successful in"};
enum { NP = 4 };

typedef struct sink {
    int32_t ids[4096];
    int n;
} sink;

static bool take(void *u, const kiln_gen_token *t)
{
    sink *s = u;
    if (t->id >= 0 && s->n < 4096) s->ids[s->n++] = t->id;
    return true;
}

static kiln_engine *load(kiln_ctx *ctx, const char *path, kiln_dtype wt, kiln_config *cfg,
                         kiln_tokenizer **tok)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char latest[4200];
    snprintf(latest, sizeof latest, "%s/latest", path);
    FILE *f = fopen(latest, "r");
    if (f) { /* a run directory: its latest checkpoint */
        char name[256] = "";
        if (fscanf(f, "%255s", name) == 1) snprintf(dir, sizeof dir, "%s/%s", path, name);
        fclose(f);
    }
    kiln_model *m = NULL;
    kiln_engine *e = NULL;
    if (kiln_model_load(ctx, dir, &m) || kiln_tokenizer_load(ctx, dir, tok)) {
        fprintf(stderr, "bench_spec: %s: %s\n", dir, kiln_errmsg(ctx));
        kiln_model_free(m);
        return NULL;
    }
    *cfg = *kiln_model_config(m);
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.wtype = wt;
    if (kiln_engine_new(ctx, m, &eo, &e)) fprintf(stderr, "bench_spec: %s\n", kiln_errmsg(ctx));
    kiln_model_free(m);
    return e;
}

static size_t n_params(const kiln_config *c)
{
    size_t C = (size_t)c->n_embd, F = c->n_inner > 0 ? (size_t)c->n_inner : 4 * C;
    size_t kv = c->n_kv_head > 0 && c->n_head > 0 ? C / (size_t)c->n_head * c->n_kv_head : C;
    size_t per = c->arch == KILN_ARCH_LLAMA ? 2 * C * C + 2 * C * kv + 3 * C * F /* SwiGLU */
                                            : 4 * C * C + 2 * C * F;
    return (size_t)c->n_layer * per + (size_t)c->vocab_size * C;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The cost of one target step over T tokens of one sequence (what a
 * verification of T - 1 drafted tokens costs), at position 64, against a
 * 1-token step: the ratio that bounds the speed-up. Best of 30 tries. */
static void step_costs(kiln_ctx *ctx, kiln_engine *e, int V, int maxT, const char *name,
                       kiln_engine *other)
{
    enum { P = 64, TRIES = 30 };
    int32_t ids[P];
    for (int i = 0; i < P; i++) ids[i] = (int32_t)((i * 7 + 3) % V);
    float *lg = malloc((size_t)(maxT + 1) * (size_t)V * sizeof(float));
    if (!lg) return;
    kiln_engine_reset(e, 0);
    kiln_engine_prefill(ctx, e, 0, ids, P, NULL);
    printf("%s step over T tokens (best ms, x the 1-token step's best; median x its median):",
           name);
    double one = 0, one_med = 0;
    for (int T = 1; T <= maxT; T++) {
        kiln_engine_tok tk[64];
        for (int t = 0; t < T; t++) tk[t] = (kiln_engine_tok){0, ids[t], true};
        double best = 1e30, all[TRIES];
        for (int i = 0; i < TRIES; i++) {
            if (other) { /* as in a round: the draft's steps run between the target's */
                kiln_engine_reset(other, 0);
                kiln_engine_tok dk = {0, ids[0], false};
                for (int j = 0; j < 3; j++) kiln_engine_step(ctx, other, &dk, 1, NULL);
            }
            double t0 = kiln_time_now();
            kiln_engine_step(ctx, e, tk, T, lg);
            double dt = kiln_time_now() - t0;
            kiln_engine_copy_prefix(ctx, e, 0, 0, P);
            if (dt < best) best = dt;
            all[i] = dt;
        }
        qsort(all, TRIES, sizeof all[0], cmp_double);
        if (T == 1) one = best, one_med = all[TRIES / 2];
        printf(" T=%d %.3f (%.2fx; median %.2fx)", T, best * 1e3, best / one,
               all[TRIES / 2] / one_med);
    }
    printf("\n");
    kiln_engine_reset(e, 0);
    free(lg);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr,
                "usage: bench_spec TARGET DRAFT [K] [TOKENS] [THREADS] [ROUNDS] [fp32|bf16]\n");
        return 2;
    }
    int K = argc > 3 ? atoi(argv[3]) : 4, ntok = argc > 4 ? atoi(argv[4]) : 128;
    int threads = argc > 5 ? atoi(argv[5]) : 1, rounds = argc > 6 ? atoi(argv[6]) : 3;
    kiln_dtype wt = argc > 7 && !strcmp(argv[7], "bf16") ? KILN_DTYPE_BF16 : KILN_DTYPE_F32;
    bench_print_cpu();
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_threads(ctx, threads);
    kiln_config tc, dc;
    kiln_tokenizer *tt = NULL, *dt = NULL;
    kiln_engine *e = load(ctx, argv[1], wt, &tc, &tt), *de = load(ctx, argv[2], wt, &dc, &dt);
    if (!e || !de) return 1;
    if (kiln_spec_check(ctx, &tc, tt, &dc, dt)) {
        fprintf(stderr, "bench_spec: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    printf("target %d layers x %d (%.2fM weights), draft %d layers x %d (%.2fM): %.1fx; "
           "K = %d, %d tokens per prompt, %d prompts, %d threads, %s weights\n",
           tc.n_layer, tc.n_embd, n_params(&tc) / 1e6, dc.n_layer, dc.n_embd,
           n_params(&dc) / 1e6, (double)n_params(&tc) / (double)n_params(&dc), K, ntok, NP,
           threads, kiln_dtype_name(wt));
    float *logits = malloc((size_t)tc.vocab_size * sizeof(float));
    step_costs(ctx, e, tc.vocab_size, K + 1 > 8 ? K + 1 : 8, "target", NULL);
    step_costs(ctx, e, tc.vocab_size, K + 1 > 8 ? K + 1 : 8, "target, 3 draft steps between,", de);
    step_costs(ctx, de, dc.vocab_size, 1, "draft ", NULL);
    double best_base = 1e30, best_spec = 1e30, last_base = 0, last_spec = 0;
    kiln_spec_stats tot = {0};
    bool same = true;
    static sink a, b;
    for (int r = 0; r < rounds; r++) {
        double t_base = 0, t_spec = 0;
        for (int p = 0; p < NP; p++) {
            int32_t *ids = NULL, *pid = NULL;
            size_t n = 0, np = 0;
            kiln_tokenizer_encode(ctx, tt, prompts[p], strlen(prompts[p]), &ids, &n);
            kiln_prompt_ids(ctx, &tc, tt, ids, n, &pid, &np);
            free(ids);
            kiln_gen_opts o = kiln_gen_opts_default();
            o.sampling.temperature = 0;
            o.ignore_eos = true;
            o.max_tokens = ntok;
            kiln_gen *g = NULL;
            /* decode time: the generation minus its prompt's prefill */
            kiln_gen_new(ctx, tt, &tc, &o, pid, np, &g);
            a.n = 0;
            kiln_engine_reset(e, 0);
            double t0 = kiln_time_now();
            kiln_engine_prefill(ctx, e, 0, pid, (int)np, logits);
            double t1 = kiln_time_now();
            kiln_engine_reset(e, 0);
            double t2 = kiln_time_now();
            kiln_generate(ctx, e, 0, g, pid, np, logits, take, &a);
            t_base += kiln_time_now() - t2 - (t1 - t0);
            kiln_gen_free(g);
            kiln_gen_new(ctx, tt, &tc, &o, pid, np, &g);
            b.n = 0;
            kiln_engine_reset(e, 0);
            kiln_engine_reset(de, 0);
            kiln_spec_opts so = {.n_draft = K};
            kiln_spec_stats ss;
            t2 = kiln_time_now();
            if (kiln_generate_spec(ctx, e, de, &so, 0, g, pid, np, take, &b, &ss)) {
                fprintf(stderr, "bench_spec: %s\n", kiln_errmsg(ctx));
                return 1;
            }
            t_spec += kiln_time_now() - t2 - (t1 - t0); /* (the draft's prefill is counted) */
            kiln_gen_free(g);
            same = same && a.n == b.n && !memcmp(a.ids, b.ids, sizeof(int32_t) * (size_t)a.n);
            if (r == rounds - 1) {
                tot.drafted += ss.drafted;
                tot.accepted += ss.accepted;
                tot.rounds += ss.rounds;
                tot.emitted += ss.emitted;
                tot.plain += ss.plain;
                tot.draft_s += ss.draft_s;
                tot.verify_s += ss.verify_s;
                tot.plain_s += ss.plain_s;
            }
            free(pid);
        }
        last_base = t_base, last_spec = t_spec;
        if (t_base < best_base) best_base = t_base;
        if (t_spec < best_spec) best_spec = t_spec;
    }
    double toks = (double)NP * ntok;
    printf("target alone: %.1f tok/s\n", toks / best_base);
    printf("with draft:   %.1f tok/s\n", toks / best_spec);
    printf("speed-up: %.2fx; acceptance %.1f%% (%llu of %llu drafted), %.2f tokens per target "
           "step; greedy tokens identical: %s\n",
           best_base / best_spec,
           tot.drafted ? 100.0 * (double)tot.accepted / (double)tot.drafted : 0.0,
           (unsigned long long)tot.accepted, (unsigned long long)tot.drafted,
           tot.rounds ? (double)tot.emitted / (double)tot.rounds : 0.0, same ? "yes" : "NO");
    /* where the last round's time went, per verify round of the target,
     * against the target alone's time per token in the same round */
    if (tot.rounds) {
        double nr = (double)tot.rounds, per = last_spec / nr;
        printf("last round: %.3f ms per verify round = draft steps %.3f + verify step %.3f + "
               "plain steps %.3f + the rest %.3f; target alone %.3f ms per token\n",
               per * 1e3, tot.draft_s / nr * 1e3, tot.verify_s / nr * 1e3,
               tot.plain_s / nr * 1e3,
               (last_spec - tot.draft_s - tot.verify_s - tot.plain_s) / nr * 1e3,
               last_base / toks * 1e3);
    }
    free(logits);
    kiln_engine_free(e);
    kiln_engine_free(de);
    kiln_tokenizer_free(tt);
    kiln_tokenizer_free(dt);
    kiln_ctx_free(ctx);
    return same ? 0 : 1;
}
