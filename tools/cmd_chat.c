/*
 * cmd_chat.c — `kiln chat`: an interactive chat with a model. The history
 * is rendered with the tokenizer's chat template (kiln_chat_render, the
 * same as the server's /v1/chat/completions) and each reply streams to
 * stdout. /reset forgets the history, /exit (or end of input) quits.
 * Ctrl-C during a reply stops that reply (what was said stays in the
 * history); at the prompt it quits. When the conversation outgrows the
 * context the oldest turns are dropped (the system message stays), so
 * the new message is still answered. Built on kiln.h only.
 */
#include "cli.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Set by SIGINT; a signal handler can only reach a global. */
static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

typedef struct chat {
    kiln_ctx *ctx;
    kiln_engine *e;
    kiln_engine *de;     /* --draft: speculative decoding, or NULL */
    int draft_tokens;
    kiln_tokenizer *tok;
    kiln_sampling sp;
    float *logits;
    kiln_config cfg;
    int V, stop_id, n_ctx, max_tokens;
    kiln_chat_msg *hist; /* the conversation; contents are owned */
    int n, cap;
    int n_fixed;         /* leading messages never dropped (the system one) */
} chat;

static bool push(chat *c, const char *role, const char *content)
{
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 16;
        kiln_chat_msg *h = realloc(c->hist, (size_t)cap * sizeof *h);
        if (!h) return false;
        c->hist = h;
        c->cap = cap;
    }
    char *t = strdup(content);
    if (!t) return false;
    c->hist[c->n++] = (kiln_chat_msg){.role = role, .content = t};
    return true;
}

static void pop_to(chat *c, int n)
{
    while (c->n > n) free((char *)c->hist[--c->n].content);
}

/* Drops the oldest turn after the fixed messages: a user message and the
 * assistant reply after it. Returns false when only the last message (the
 * new user message) is left to drop. */
static bool drop_oldest(chat *c)
{
    int k = c->n_fixed;
    if (c->n - k <= 1) return false;
    int m = 1;
    if (k + 1 < c->n - 1 && !strcmp(c->hist[k + 1].role, "assistant")) m = 2;
    for (int i = k; i < k + m; i++) free((char *)c->hist[i].content);
    memmove(c->hist + k, c->hist + k + m, (size_t)(c->n - k - m) * sizeof *c->hist);
    c->n -= m;
    return true;
}

/* Prints a reply's text as it comes; Ctrl-C (the flag) stops the reply. */
static bool print_piece(void *user, const kiln_gen_token *t)
{
    (void)user;
    fwrite(t->text, 1, t->len, stdout);
    fflush(stdout);
    return !interrupted;
}

/* One turn: the whole conversation is rendered with the chat template and
 * prefilled (matrix products make that cheap), then the reply streams
 * through the library's generation loop, ending at <|im_end|>. */
static kiln_status turn(chat *c, const char *user, uint64_t seed)
{
    int keep = c->n;
    if (!push(c, "user", user)) return kiln_fail(c->ctx, KILN_ERR_NOMEM, "out of memory");
    int32_t *ids = NULL;
    size_t n = 0;
    /* room for a reply: --max-tokens, at most a quarter of the context */
    int room = c->max_tokens < c->n_ctx / 4 ? c->max_tokens : c->n_ctx / 4;
    if (room < 8) room = 8;
    int dropped = 0;
    kiln_status st;
    for (;;) {
        st = kiln_chat_render(c->ctx, c->tok, c->hist, c->n, true, &ids, NULL, &n);
        if (st || (int)n + room < c->n_ctx) break;
        free(ids);
        ids = NULL;
        int before = c->n;
        if (!drop_oldest(c)) {
            st = kiln_fail(c->ctx, KILN_ERR_RANGE,
                           "the message (%zu tokens with the template) leaves no room for a "
                           "reply in the %d-token context; send a shorter one", n, c->n_ctx);
            break;
        }
        dropped += before - c->n;
        keep -= before - c->n;
    }
    if (dropped)
        fprintf(stderr, "(dropped the %d oldest message%s to fit the %d-token context)\n",
                dropped, dropped == 1 ? "" : "s", c->n_ctx);
    /* BOS first where the model wants it, as the server does */
    int32_t *prompt = NULL;
    size_t np = 0;
    if (!st) st = kiln_prompt_ids(c->ctx, &c->cfg, c->tok, ids, n, &prompt, &np);
    free(ids);
    kiln_gen *g = NULL;
    kiln_spec_stats ss = {0};
    kiln_gen_opts go = kiln_gen_opts_default();
    go.sampling = c->sp;
    go.sampling.seed = seed;
    go.max_tokens = c->max_tokens;
    const char *stop = "<|im_end|>";
    int32_t stop_id = c->stop_id;
    go.stops = &stop;
    go.n_stops = 1;
    go.stop_ids = &stop_id;
    go.n_stop_ids = stop_id >= 0 ? 1 : 0;
    if (!st) st = kiln_gen_new(c->ctx, c->tok, &c->cfg, &go, prompt, np, &g);
    double t0 = kiln_time_now();
    interrupted = 0;
    if (!st) {
        kiln_engine_reset(c->e, 0);
        if (c->de) {
            kiln_spec_opts so = {.n_draft = c->draft_tokens};
            kiln_engine_reset(c->de, 0);
            st = kiln_generate_spec(c->ctx, c->e, c->de, &so, 0, g, prompt, np, print_piece, NULL,
                                    &ss);
        } else {
            st = kiln_generate(c->ctx, c->e, 0, g, prompt, np, c->logits, print_piece, NULL);
        }
    }
    free(prompt);
    if (st && (!g || kiln_gen_count(g) == 0)) {
        kiln_gen_free(g);
        pop_to(c, keep);
        return st;
    }
    double dt = kiln_time_now() - t0;
    int gen = kiln_gen_count(g);
    fprintf(stdout, "\n");
    fflush(stdout);
    char spec[160] = "";
    if (c->de && ss.drafted)
        snprintf(spec, sizeof spec, ", draft accepted %.0f%%, %.2f tokens per target step, "
                 "estimated speed-up %.2fx", 100.0 * (double)ss.accepted / (double)ss.drafted,
                 (double)ss.emitted / (double)ss.rounds, kiln_spec_speedup(&ss));
    fprintf(stderr, "[%d tokens, %.1f tok/s%s%s]\n", gen, dt > 0 ? gen / dt : 0.0, spec,
            kiln_gen_finished(g) == KILN_FINISH_CANCELLED ? ", stopped by Ctrl-C" : "");
    interrupted = 0;
    if (!st && !push(c, "assistant", kiln_gen_text(g, NULL)))
        st = kiln_fail(c->ctx, KILN_ERR_NOMEM, "out of memory");
    kiln_gen_free(g);
    return st;
}

int cmd_chat(int argc, char **argv)
{
    const char *model = NULL, *tokenizer = NULL, *system = NULL, *dtype = NULL;
    const char *adapter = NULL;
    const char *draft = NULL;
    int draft_tokens = 4;
    int max_tokens = 256, top_k = 0, ctx_len = 0, threads = 0;
    double temperature = 0.7, top_p = 0.95, rep = 1.0;
    int64_t seed = 0;
    cli_opt opts[] = {
        {"model", CLI_STR, &model, "model directory, or a run directory: its latest checkpoint", true},
        {"adapter", CLI_STR, &adapter, "PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors; e.g. a kiln sft --lora-rank checkpoint) merged into --model at load [none]", false},
        {"system", CLI_STR, &system, "system message", false},
        {"max-tokens", CLI_INT, &max_tokens, "tokens per reply at most [256]", false},
        {"temperature", CLI_F64, &temperature, "0 = greedy [0.7]", false},
        {"top-k", CLI_INT, &top_k, "0 = off [0]", false},
        {"top-p", CLI_F64, &top_p, "[0.95]", false},
        {"repetition-penalty", CLI_F64, &rep, "[1.0]", false},
        {"seed", CLI_I64, &seed, "sampling seed of the first reply (then +1 per reply) [0]", false},
        {"tokenizer", CLI_STR, &tokenizer, "tokenizer.json, a directory, or \"bytes\" [the model directory]", false},
        {"dtype", CLI_STR, &dtype, "weight storage: " CLI_WEIGHT_DTYPES " [fp32; a .gguf model: its own types]", false},
        {"ctx", CLI_INT, &ctx_len, "context length, 0 = the model's [0]", false},
        {"draft", CLI_STR, &draft, "speculative decoding: a smaller draft model (directory or .gguf) sharing the model's tokenizer; replies are distributed exactly as without it [off]", false},
        {"draft-tokens", CLI_INT, &draft_tokens, "tokens the draft proposes per target step, 1..16 [4]", false},
        {"threads", CLI_INT, &threads, "OpenMP threads, 0 = all cores [0]", false},
        {NULL, 0, NULL, NULL, false},
    };
    int rc = cli_parse("chat", "chat --model DIR [--system TEXT] [--temperature T]",
                       "Interactive chat (the model's chat template, else ChatML). Type a message and Enter;\n"
                       "/reset forgets the conversation, /exit quits. Ctrl-C stops a\n"
                       "reply; at the prompt it quits. The oldest turns are dropped when\n"
                       "the conversation outgrows the context.",
                       opts, argc, argv, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (max_tokens < 1) {
        fprintf(stderr, "kiln chat: --max-tokens must be >= 1 (got %d)\n", max_tokens);
        return 2;
    }
    chat c = {0};
    c.ctx = cli_ctx_new();
    if (threads > 0) kiln_set_threads(c.ctx, threads);
    c.max_tokens = max_tokens;
    c.sp = kiln_sampling_default();
    c.sp.temperature = (float)temperature;
    c.sp.top_k = top_k;
    c.sp.top_p = (float)top_p;
    c.sp.repetition_penalty = (float)rep;
    kiln_model *m = NULL;
    kiln_status st = kiln_sampling_validate(c.ctx, &c.sp);
    if (st) {
        char eb[4096];
        fprintf(stderr, "kiln chat: %s\n", cli_errmsg(c.ctx, eb, sizeof eb));
        kiln_ctx_free(c.ctx);
        return 2;
    }
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.n_ctx = ctx_len;
    if (dtype && !cli_weight_dtype("chat", dtype, &eo.wtype)) {
        kiln_ctx_free(c.ctx);
        return 2;
    }
    /* a trainer checkpoint carries checksums.json: verify before loading */
    char model_dir[4096]; /* a run directory stands for its latest checkpoint */
    if (!(st = cli_model_dir(c.ctx, model, model_dir, sizeof model_dir))) model = model_dir;
    if (!st && !(st = kiln_checkpoint_verify(c.ctx, model)) &&
        !(st = kiln_model_load(c.ctx, model, &m)) && !(st = cli_apply_adapter(c.ctx, &m, adapter)) &&
        !(st = kiln_tokenizer_load(c.ctx, tokenizer ? tokenizer : model, &c.tok))) {
        if (!dtype && !adapter && cli_is_gguf(model)) eo.weights_gguf = model; /* its own types */
        st = kiln_engine_new(c.ctx, m, &eo, &c.e);
    }
    if (!st && draft && (draft_tokens < 1 || draft_tokens > KILN_SPEC_MAX_DRAFT))
        st = kiln_fail(c.ctx, KILN_ERR_INVALID_ARG, "--draft-tokens %d must be in 1..%d",
                       draft_tokens, KILN_SPEC_MAX_DRAFT);
    c.draft_tokens = draft_tokens;
    if (!st && draft)
        st = cli_load_draft(c.ctx, draft, tokenizer, kiln_model_config(m), c.tok, &eo, &c.de);
    if (!st && kiln_tokenizer_vocab_size(c.tok) > kiln_model_config(m)->vocab_size)
        st = kiln_fail(c.ctx, KILN_ERR_INVALID_ARG,
                       "the tokenizer has %d tokens but the model's vocabulary is %d; "
                       "pass the model's own tokenizer with --tokenizer",
                       kiln_tokenizer_vocab_size(c.tok), kiln_model_config(m)->vocab_size);
    if (!st) {
        c.V = kiln_model_config(m)->vocab_size;
        c.cfg = *kiln_model_config(m);
        c.stop_id = kiln_chat_stop_id(c.tok);
        if (system && *system && !push(&c, "system", system))
            st = kiln_fail(c.ctx, KILN_ERR_NOMEM, "out of memory");
        c.n_fixed = c.n;
        c.n_ctx = kiln_engine_n_ctx(c.e);
        c.logits = malloc((size_t)c.V * sizeof(float));
        if (!c.logits) st = kiln_fail(c.ctx, KILN_ERR_NOMEM, "out of memory");
    }
    kiln_model_free(m);
    if (st) {
        rc = cli_fail(c.ctx, "chat", st);
        goto out;
    }
    /* Ctrl-C stops a reply (no SA_RESTART: at the prompt it ends getline) */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    bool tty = isatty(STDIN_FILENO);
    if (tty) fprintf(stderr, "kiln chat: /reset to start over, /exit to quit\n");
    char *line = NULL;
    size_t cap = 0;
    uint64_t s = (uint64_t)seed;
    for (;;) {
        if (tty) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        ssize_t n = getline(&line, &cap, stdin);
        if (n < 0) {
            if (interrupted || errno != EINTR) break; /* Ctrl-C at the prompt, or end */
            clearerr(stdin);
            continue;
        }
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (n == 0) continue;
        if (!strcmp(line, "/exit") || !strcmp(line, "/quit")) break;
        if (!strcmp(line, "/reset")) {
            pop_to(&c, c.n_fixed);
            fprintf(stderr, "(conversation reset)\n");
            continue;
        }
        st = turn(&c, line, s++);
        char eb[4096];
        if (st) fprintf(stderr, "kiln chat: %s\n", cli_errmsg(c.ctx, eb, sizeof eb));
    }
    free(line);
out:
    pop_to(&c, 0);
    free(c.hist);
    free(c.logits);
    kiln_engine_free(c.e);
    kiln_engine_free(c.de);
    kiln_tokenizer_free(c.tok);
    kiln_ctx_free(c.ctx);
    return rc;
}
