/*
 * cmd_tokenizer.c — `kiln tokenizer train|encode|decode` and
 * `kiln tokenize` (text / JSONL corpora to token shards).
 */
#include "cli.h"

#include <limits.h>
#include <dirent.h>
#include <sys/stat.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- shared helpers ------------------------------------------------- */

static const char *tok_help =
    "tokenizer: a tokenizer.json, a directory holding one (or GPT-2's encoder.json + "
    "vocab.bpe), or bytes";

/* Reads a whole stream into a malloc'ed buffer. */
static int read_stream(FILE *f, char **out, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap + 1);
    if (!b) return -1;
    for (;;) {
        if (n == cap) {
            cap *= 2;
            char *nb = realloc(b, cap + 1);
            if (!nb) { free(b); return -1; }
            b = nb;
        }
        size_t k = fread(b + n, 1, cap - n, f);
        n += k;
        if (k == 0) break;
    }
    if (ferror(f)) { free(b); return -1; }
    b[n] = 0;
    *out = b;
    *len = n;
    return 0;
}

static int read_input(const char *cmd, const char *path, char **buf, size_t *len)
{
    FILE *f = path ? fopen(path, "rb") : stdin;
    if (!f) {
        fprintf(stderr, "kiln %s: --input '%s': %s\n", cmd, path, strerror(errno));
        return 1;
    }
    int rc = read_stream(f, buf, len);
    if (path) fclose(f);
    if (rc) {
        fprintf(stderr, "kiln %s: cannot read %s\n", cmd, path ? path : "stdin");
        return 1;
    }
    return 0;
}

static void human_bytes(char *o, size_t cap, double b)
{
    if (b >= 1e9) snprintf(o, cap, "%.2f GB", b / 1e9);
    else if (b >= 1e6) snprintf(o, cap, "%.1f MB", b / 1e6);
    else if (b >= 1e3) snprintf(o, cap, "%.1f kB", b / 1e3);
    else snprintf(o, cap, "%.0f B", b);
}

/* ---- kiln tokenizer encode / decode --------------------------------- */

/* Renders a JSON conversation ([{"role","content"}...] or {"messages":
 * [...]}) through the chat template. The one JSON parse in the CLI goes
 * through the library: each message is read with kiln_jsonl_get_string. */
static kiln_status chat_from_json(kiln_ctx *ctx, const kiln_tokenizer *tok, const char *buf,
                                  size_t len, bool gen, int32_t **ids, uint8_t **mask,
                                  size_t *n)
{
    /* split the array into message objects by brace depth (strings aware) */
    kiln_chat_msg msgs[256];
    char *owned[512];
    int nm = 0, no = 0, depth = 0;
    bool in_str = false, esc = false;
    const char *obj = NULL;
    kiln_status s = KILN_OK;
    const char *p = buf, *end = buf + len;
    const char *arr = memchr(buf, '[', len);
    if (!arr) return kiln_fail(ctx, KILN_ERR_FORMAT, "--chat: the input must hold a JSON array of messages");
    for (p = arr + 1; p < end && !s; p++) {
        char c = *p;
        if (in_str) {
            if (esc) esc = false;
            else if (c == '\\') esc = true;
            else if (c == '"') in_str = false;
            continue;
        }
        if (c == '"') in_str = true;
        else if (c == '{') { if (depth++ == 0) obj = p; }
        else if (c == '}' && depth > 0 && --depth == 0) {
            if (nm == 256) { s = kiln_fail(ctx, KILN_ERR_RANGE, "--chat: more than 256 messages"); break; }
            char *role = NULL, *content = NULL;
            size_t rl, cl;
            if ((s = kiln_jsonl_get_string(ctx, obj, (size_t)(p + 1 - obj), "role", &role, &rl)) ||
                (s = kiln_jsonl_get_string(ctx, obj, (size_t)(p + 1 - obj), "content", &content, &cl))) {
                s = kiln_fail(ctx, s, "--chat: message %d: %s", nm, kiln_errmsg(ctx));
                free(role);
                break;
            }
            owned[no++] = role;
            owned[no++] = content;
            msgs[nm] = (kiln_chat_msg){.role = role, .content = content, .content_len = cl};
            nm++;
        } else if (c == ']' && depth == 0) break;
    }
    if (!s) s = kiln_chat_render(ctx, tok, msgs, nm, gen, ids, mask, n);
    for (int i = 0; i < no; i++) free(owned[i]);
    return s;
}

static int tokenizer_encode(int argc, char **argv)
{
    const char *spec = NULL, *input = NULL;
    bool json = false, chat = false, special = false, gen = false, add_special = false;
    cli_opt opts[] = {
        {"tokenizer", CLI_STR, &spec, "tokenizer.json, a directory, or bytes", true},
        {"input", CLI_STR, &input, "text file to encode [stdin]", false},
        {"json", CLI_BOOL, &json, "print a JSON array instead of space-separated ids", false},
        {"special", CLI_BOOL, &special, "recognise special tokens such as <|endoftext|> in the text", false},
        {"add-special", CLI_BOOL, &add_special, "add what the tokenizer.json post_processor puts around a text (Hugging Face's add_special_tokens=True, e.g. Llama 3's <|begin_of_text|>) [off]", false},
        {"chat", CLI_BOOL, &chat, "the input is a JSON messages array (or {\"messages\": [...]}): "
                                  "render it with the chat template, print ids and the loss mask", false},
        {"generation-prompt", CLI_BOOL, &gen, "with --chat: end with the assistant prompt", false},
        {NULL, 0, NULL, NULL, false}};
    int rc = cli_parse("tokenizer encode", "tokenizer encode --tokenizer PATH [--input FILE] [--json] [--chat]",
                       "Encodes text (stdin or --input) to token ids printed on one line. "
                       "Special tokens are not recognised in the text unless --special. "
                       "With --chat the input is a conversation; the ids line is followed by "
                       "a line \"mask: 0 0 1 ...\" (1 = learned in fine-tuning).",
                       opts, argc, argv, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (gen && !chat) {
        fprintf(stderr, "kiln tokenizer encode: --generation-prompt needs --chat\n");
        return 2;
    }
    if (add_special && chat) {
        fprintf(stderr, "kiln tokenizer encode: --add-special is for text; with --chat the "
                        "template decides the special tokens\n");
        return 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    kiln_tokenizer *tok = NULL;
    char *buf = NULL;
    size_t len = 0;
    kiln_status s = kiln_tokenizer_load(ctx, spec, &tok);
    if (s) { rc = cli_fail(ctx, "tokenizer encode", s); goto done; }
    if ((rc = read_input("tokenizer encode", input, &buf, &len))) goto done;
    int32_t *ids;
    uint8_t *mask = NULL;
    size_t n;
    if (chat) {
        s = chat_from_json(ctx, tok, buf, len, gen, &ids, &mask, &n);
    } else if (special) {
        s = kiln_tokenizer_encode_special(ctx, tok, buf, len, &ids, &n);
    } else if (add_special) {
        s = kiln_tokenizer_encode_add_special(ctx, tok, buf, len, &ids, &n);
    } else {
        s = kiln_tokenizer_encode(ctx, tok, buf, len, &ids, &n);
    }
    if (!s && special && add_special) { /* the template around the parsed text */
        const int32_t *pre, *suf;
        int np = kiln_tokenizer_post_ids(tok, false, &pre), ns = kiln_tokenizer_post_ids(tok, true, &suf);
        np = np < 0 ? 0 : np, ns = ns < 0 ? 0 : ns;
        int32_t *all = malloc((n + (size_t)np + (size_t)ns + 1) * sizeof *all);
        if (!all) {
            free(ids);
            s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        } else {
            if (np) memcpy(all, pre, (size_t)np * sizeof *all);
            memcpy(all + np, ids, n * sizeof *all);
            if (ns) memcpy(all + np + n, suf, (size_t)ns * sizeof *all);
            free(ids);
            ids = all;
            n += (size_t)(np + ns);
        }
    }
    if (s) { rc = cli_fail(ctx, "tokenizer encode", s); goto done; }
    if (json && mask) printf("{\"ids\": [");
    else if (json) putchar('[');
    for (size_t i = 0; i < n; i++) printf(i ? (json ? ", %d" : " %d") : "%d", ids[i]);
    if (mask) {
        printf(json ? "], \"mask\": [" : "\nmask:");
        for (size_t i = 0; i < n; i++) printf(json ? (i ? ", %d" : "%d") : " %d", mask[i]);
        printf(json ? "]}\n" : "\n");
    } else {
        printf(json ? "]\n" : "\n");
    }
    free(ids);
    free(mask);
done:
    free(buf);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
    return rc;
}

static int tokenizer_decode(int argc, char **argv)
{
    const char *spec = NULL, *input = NULL;
    cli_opt opts[] = {
        {"tokenizer", CLI_STR, &spec, "tokenizer.json, a directory, or bytes", true},
        {"input", CLI_STR, &input, "file of ids (space/comma separated or a JSON array) [stdin]", false},
        {NULL, 0, NULL, NULL, false}};
    int rc = cli_parse("tokenizer decode", "tokenizer decode --tokenizer PATH [--input FILE]",
                       "Decodes token ids (whitespace or comma separated, brackets "
                       "allowed) back to the exact bytes, written to stdout.",
                       opts, argc, argv, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    kiln_ctx *ctx = cli_ctx_new();
    kiln_tokenizer *tok = NULL;
    char *buf = NULL, *text = NULL;
    int32_t *ids = NULL;
    size_t len = 0, n = 0, cap = 0;
    kiln_status s = kiln_tokenizer_load(ctx, spec, &tok);
    if (s) { rc = cli_fail(ctx, "tokenizer decode", s); goto done; }
    if ((rc = read_input("tokenizer decode", input, &buf, &len))) goto done;
    for (char *p = buf; *p;) {
        if (strchr(" \t\r\n,[]", *p)) { p++; continue; }
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 2147483647L) {
            fprintf(stderr, "kiln tokenizer decode: '%.20s' at byte %zu is not a token id\n",
                    p, (size_t)(p - buf));
            rc = 1;
            goto done;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            int32_t *ni = realloc(ids, cap * sizeof *ni);
            if (!ni) { rc = 1; goto done; }
            ids = ni;
        }
        ids[n++] = (int32_t)v;
        p = end;
    }
    size_t tl;
    s = kiln_tokenizer_decode(ctx, tok, ids, n, &text, &tl);
    if (s) { rc = cli_fail(ctx, "tokenizer decode", s); goto done; }
    fwrite(text, 1, tl, stdout);
done:
    free(buf);
    free(ids);
    free(text);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
    return rc;
}

static int tokenizer_convert(int argc, char **argv)
{
    const char *spec = NULL, *out = NULL;
    cli_opt opts[] = {
        {"tokenizer", CLI_STR, &spec, "tokenizer.json, a directory, or bytes", true},
        {"out", CLI_STR, &out, "tokenizer.json to write", true},
        {NULL, 0, NULL, NULL, false}};
    int rc = cli_parse("tokenizer convert", "tokenizer convert --tokenizer SPEC --out FILE",
                       "Writes any tokenizer kiln reads (GPT-2's encoder.json + vocab.bpe, "
                       "bytes, a tokenizer.json) as a Hugging Face tokenizer.json.",
                       opts, argc, argv, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    kiln_ctx *ctx = cli_ctx_new();
    kiln_tokenizer *tok = NULL;
    kiln_status s = kiln_tokenizer_load(ctx, spec, &tok);
    if (!s) s = kiln_tokenizer_save(ctx, tok, out);
    if (s) rc = cli_fail(ctx, "tokenizer convert", s);
    else printf("wrote %s (vocab %d, end-of-text id %d)\n", out,
                kiln_tokenizer_vocab_size(tok), kiln_tokenizer_eot(tok));
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
    return rc;
}

typedef struct train_progress {
    bool tty;
    double t0, last_line, merge_t0;
    char done_phase[8]; /* last phase reported complete */
} train_progress;

static void train_progress_fn(void *ud, const char *phase, int64_t done, int64_t total)
{
    train_progress *tp = ud;
    double el = kiln_time_now() - tp->t0;
    double frac = total > 0 ? (double)done / (double)total : 1;
    if (frac > 1) frac = 1;
    bool count = !strcmp(phase, "count");
    if (frac >= 1) {
        if (!strcmp(tp->done_phase, phase)) return; /* already reported */
        snprintf(tp->done_phase, sizeof tp->done_phase, "%s", phase);
    }
    char what[64];
    if (count) {
        char a[32], b[32];
        human_bytes(a, sizeof a, (double)done);
        human_bytes(b, sizeof b, (double)total);
        snprintf(what, sizeof what, "%s/%s", a, b);
    } else {
        snprintf(what, sizeof what, "%lld/%lld merges", (long long)done, (long long)total);
    }
    if (!count && tp->merge_t0 == 0) tp->merge_t0 = el;
    double pel = count ? el : el - tp->merge_t0; /* time in this phase */
    double eta = frac > 0.01 && frac < 1 ? pel * (1 - frac) / frac : 0;
    if (tp->tty) {
        char bar[31];
        int k = (int)(frac * 30);
        for (int i = 0; i < 30; i++) bar[i] = i < k ? '#' : '.';
        bar[30] = 0;
        fprintf(stderr, "\r%-5s [%s] %5.1f%% %s %.0fs ETA %.0fs ", count ? "count" : "merge", bar,
                100 * frac, what, el, eta);
        if (frac >= 1) fputc('\n', stderr);
    } else if (el - tp->last_line >= 10 || frac >= 1) {
        tp->last_line = el;
        fprintf(stderr, "tokenizer train: %s %5.1f%% %s %.0fs ETA %.0fs\n", phase, 100 * frac,
                what, el, eta);
    }
}

static int tokenizer_train(int argc, char **argv)
{
    kiln_tokenizer_train_opts o = kiln_tokenizer_train_opts_default();
    cli_list inputs = {0}, specials = {0};
    const char *out = NULL;
    bool quiet = false;
    cli_opt opts[] = {
        {"input", CLI_LIST, &inputs, "text files, .jsonl files or directories", true},
        {"vocab-size", CLI_INT, &o.vocab_size, "vocabulary size, bytes and specials included [32000]", false},
        {"out", CLI_STR, &out, "tokenizer.json to write", true},
        {"special", CLI_LIST, &specials, "extra special tokens (<|endoftext|>, <|im_start|>, "
                                         "<|im_end|> are always added)", false},
        {"pattern", CLI_STR, &o.pattern, "pre-tokenization: gpt2, llama3 or a PCRE2 regex [gpt2]", false},
        {"min-frequency", CLI_INT, &o.min_frequency, "stop when the best pair occurs fewer times [2]", false},
        {"field", CLI_STR, &o.field, "JSONL field holding the text [text]", false},
        {"max-bytes", CLI_I64, &o.max_bytes, "read at most this many input bytes [all]", false},
        {"threads", CLI_INT, &o.threads, "counting threads [all cores]", false},
        {"quiet", CLI_BOOL, &quiet, "no progress output", false},
        {NULL, 0, NULL, NULL, false}};
    int rc = cli_parse("tokenizer train",
                       "tokenizer train --input FILES... --vocab-size N --out tokenizer.json [--special TOK...]",
                       "Learns a byte-level BPE (GPT-2 style) from text and writes a Hugging "
                       "Face tokenizer.json. Ids 0..255 are bytes, then the merges, then the "
                       "special tokens.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    train_progress tp = {.tty = isatty(STDERR_FILENO) != 0, .t0 = kiln_time_now()};
    o.inputs = inputs.items;
    o.n_inputs = inputs.n;
    o.specials = specials.items;
    o.n_specials = specials.n;
    if (!quiet) {
        o.progress = train_progress_fn;
        o.progress_ud = &tp;
    }
    kiln_tokenizer *tok = NULL;
    kiln_tokenizer_train_stats st;
    kiln_status s = KILN_OK;
    if (o.min_frequency < 1 || o.max_bytes < 0)
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      o.min_frequency < 1 ? "--min-frequency %lld must be at least 1"
                                          : "--max-bytes %lld must be >= 0 (0 = all)",
                      o.min_frequency < 1 ? (long long)o.min_frequency
                                          : (long long)o.max_bytes);
    if (!s) {
        /* fail before a long training run, not after it: --out must name a
         * file in an existing directory */
        struct stat ost;
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", out);
        char *sl = strrchr(parent, '/');
        if (sl == parent) sl[1] = 0;
        else if (sl) *sl = 0;
        else snprintf(parent, sizeof parent, ".");
        if (stat(out, &ost) == 0 && S_ISDIR(ost.st_mode))
            s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                          "--out '%s' is a directory; give the tokenizer.json file "
                          "to write (e.g. %s/tokenizer.json)", out, out);
        else if (stat(parent, &ost) != 0 || !S_ISDIR(ost.st_mode))
            s = kiln_fail(ctx, KILN_ERR_IO,
                          "--out '%s': directory '%s' does not exist; create it first",
                          out, parent);
    }
    if (!s) s = kiln_tokenizer_train(ctx, &o, &tok, &st);
    if (!s && st.pretokens == 0)
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "the --input files hold no text to learn merges from; "
                      "give non-empty text or JSONL files");
    if (!s) s = kiln_tokenizer_save(ctx, tok, out);
    fflush(stderr);
    if (s) rc = cli_fail(ctx, "tokenizer train", s);
    else {
        char b[32];
        human_bytes(b, sizeof b, (double)st.bytes);
        printf("trained on %s (%lld pre-tokens, %lld distinct): %d merges, vocab %d, "
               "end-of-text id %d; counting %.1fs, merging %.1fs -> %s\n",
               b, (long long)st.pretokens, (long long)st.unique_pretokens, st.merges,
               kiln_tokenizer_vocab_size(tok), kiln_tokenizer_eot(tok), st.count_seconds,
               st.merge_seconds, out);
        if (kiln_tokenizer_vocab_size(tok) < o.vocab_size)
            printf("note: no pair occurs %d times any more, so the vocabulary is smaller "
                   "than --vocab-size %d\n", o.min_frequency, o.vocab_size);
    }
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return rc;
}

int cmd_tokenizer(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        printf("usage: kiln tokenizer train|encode|decode|convert [flags]  (--help on each)\n\n"
               "  train    learn a byte-level BPE tokenizer from text files\n"
               "  encode   text to token ids\n"
               "  decode   token ids to text\n"
               "  convert  write any tokenizer kiln reads as tokenizer.json\n");
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "encode")) return tokenizer_encode(argc - 1, argv + 1);
    if (!strcmp(argv[1], "decode")) return tokenizer_decode(argc - 1, argv + 1);
    if (!strcmp(argv[1], "train")) return tokenizer_train(argc - 1, argv + 1);
    if (!strcmp(argv[1], "convert")) return tokenizer_convert(argc - 1, argv + 1);
    fprintf(stderr, "kiln tokenizer: unknown subcommand '%s' (train, encode, decode or convert)\n",
            argv[1]);
    return 2;
}

/* ---- kiln tokenize -------------------------------------------------- */

typedef struct progress_state {
    bool tty;
    double last_line;
} progress_state;

static void tokenize_progress(void *ud, const kiln_tokenize_progress *p)
{
    progress_state *ps = ud;
    double frac = p->bytes_total > 0 ? (double)p->bytes_done / (double)p->bytes_total : 1;
    if (frac > 1) frac = 1;
    double rate = p->seconds > 0 ? (double)p->bytes_done / p->seconds : 0;
    double eta = rate > 0 ? (double)(p->bytes_total - p->bytes_done) / rate : 0;
    if (eta < 0) eta = 0;
    char done[32], tot[32];
    human_bytes(done, sizeof done, (double)p->bytes_done);
    human_bytes(tot, sizeof tot, (double)p->bytes_total);
    if (ps->tty) {
        char bar[31];
        int k = (int)(frac * 30);
        for (int i = 0; i < 30; i++) bar[i] = i < k ? '#' : '.';
        bar[30] = 0;
        fprintf(stderr, "\rtokenize [%s] %5.1f%% %s/%s %.1f MB/s %lld tokens ETA %.0fs ",
                bar, 100 * frac, done, tot, rate / 1e6, (long long)p->tokens, eta);
        if (frac >= 1) fputc('\n', stderr);
    } else if (p->seconds - ps->last_line >= 10 || frac >= 1) {
        ps->last_line = p->seconds;
        fprintf(stderr, "tokenize: %5.1f%% %s/%s %.1f MB/s %lld tokens ETA %.0fs\n",
                100 * frac, done, tot, rate / 1e6, (long long)p->tokens, eta);
    }
}

/* kiln tokenize --dataset KIND: load (validate) each file, print stats. */
static int check_datasets(kiln_ctx *ctx, const kiln_tokenizer *tok, const char *kind_name,
                          const cli_list *inputs, int max_len, bool skip_bad)
{
    kiln_dataset_kind kind;
    if (!strcmp(kind_name, "sft")) kind = KILN_DATASET_SFT;
    else if (!strcmp(kind_name, "preference")) kind = KILN_DATASET_PREFERENCE;
    else if (!strcmp(kind_name, "prompts")) kind = KILN_DATASET_PROMPTS;
    else {
        fprintf(stderr, "kiln tokenize: --dataset '%s' must be sft, preference or prompts\n", kind_name);
        return 2;
    }
    int rc = 0;
    for (int i = 0; i < inputs->n; i++) {
        kiln_dataset_opts o = kiln_dataset_opts_default();
        o.max_len = max_len;
        o.skip_bad = skip_bad;
        kiln_dataset *ds;
        kiln_status s = kiln_dataset_load(ctx, tok, inputs->items[i], kind, &o, &ds);
        if (s) {
            rc = cli_fail(ctx, "tokenize", s);
            continue;
        }
        kiln_dataset_stats st;
        kiln_dataset_get_stats(ds, &st);
        printf("%s: %lld lines, %lld examples, %lld tokens", inputs->items[i], (long long)st.lines,
               (long long)st.examples, (long long)st.tokens);
        if (kind == KILN_DATASET_SFT) printf(" (%lld learned)", (long long)st.loss_tokens);
        printf(", %lld malformed, %lld truncated, %lld dropped\n", (long long)st.bad_lines,
               (long long)st.truncated, (long long)st.dropped);
        kiln_dataset_free(ds);
    }
    return rc;
}

/* --out of kiln tokenize: a new or empty directory, or an earlier kiln data
 * directory (it has meta.json; re-tokenizing replaces it). Anything else --
 * a model directory, a run, a folder of notes -- would have its
 * tokenizer.json / meta.json overwritten, so it is refused. An --input equal
 * to --out would read the outputs back as documents. */
static kiln_status check_data_out(kiln_ctx *ctx, const char *out, const cli_list *inputs)
{
    char ro[PATH_MAX], ri[PATH_MAX];
    if (!realpath(out, ro)) return KILN_OK; /* does not exist yet */
    for (int i = 0; i < inputs->n; i++)
        if (realpath(inputs->items[i], ri) && !strcmp(ri, ro))
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "--input '%s' is the --out directory; write the "
                             "shards to another directory",
                             inputs->items[i]);
    struct stat st;
    if (stat(ro, &st) != 0 || !S_ISDIR(st.st_mode)) return KILN_OK; /* reported later */
    char mp[PATH_MAX + 16];
    snprintf(mp, sizeof mp, "%s/meta.json", ro);
    if (stat(mp, &st) == 0) return KILN_OK; /* an earlier kiln data directory */
    DIR *d = opendir(ro);
    if (!d) return KILN_OK;
    const char *found = NULL;
    char first[256] = "";
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(first, sizeof first, "%s", e->d_name);
        found = first;
        break;
    }
    closedir(d);
    if (found)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "--out '%s' is not empty (it holds '%s') and is not a kiln "
                         "data directory (no meta.json); choose a new or empty "
                         "directory so nothing in it is overwritten",
                         out, found);
    return KILN_OK;
}

int cmd_tokenize(int argc, char **argv)
{
    kiln_tokenize_opts o = kiln_tokenize_opts_default();
    const char *spec = "bytes";
    cli_list inputs = {0};
    int threads = 0, max_len = 0;
    bool quiet = false;
    const char *dataset = NULL;
    cli_opt opts[] = {
        {"tokenizer", CLI_STR, &spec, "tokenizer.json, a directory holding one or GPT-2's "
                                      "encoder.json + vocab.bpe, or bytes [bytes]", false},
        {"input", CLI_LIST, &inputs, "text files, JSONL files or directories", true},
        {"out", CLI_STR, &o.out_dir, "output data directory", true},
        {"val-fraction", CLI_F64, &o.val_fraction, "share of documents held out for validation [0]", false},
        {"format", CLI_STR, &o.format, "auto (.jsonl files are JSONL), text or jsonl [auto]", false},
        {"field", CLI_STR, &o.field, "JSONL field holding the text [text]", false},
        {"doc-separator", CLI_STR, &o.doc_separator, "a line equal to this separates documents "
                                                     "in text files [one document per file]", false},
        {"shard-tokens", CLI_I64, &o.shard_tokens, "tokens per shard file [100000000]", false},
        {"threads", CLI_INT, &threads, "encoding threads [all cores]", false},
        {"skip-bad", CLI_BOOL, &o.skip_bad, "skip malformed JSONL lines (still reported)", false},
        {"quiet", CLI_BOOL, &quiet, "no progress output", false},
        {"dataset", CLI_STR, &dataset, "check tuning JSONL instead: sft, preference or prompts "
                                       "(every malformed line reported; no --out needed)", false},
        {"max-len", CLI_INT, &max_len, "with --dataset: truncate examples to this many tokens", false},
        {NULL, 0, NULL, NULL, false}};
    for (int i = 1; i < argc; i++) /* --out is optional with --dataset */
        if (!strcmp(argv[i], "--dataset") || !strncmp(argv[i], "--dataset=", 10)) opts[2].required = false;
    int rc = cli_parse("tokenize",
                       "tokenize --input FILES... --out DIR [--tokenizer SPEC] [--val-fraction F]",
                       "Turns text files, directories and JSONL files into token shards "
                       "(DIR/train_NNNN.bin, DIR/val_NNNN.bin, DIR/meta.json, "
                       "DIR/tokenizer.json) for kiln train. Every document is preceded by "
                       "the end-of-text token. Inside directories, hidden files, symlinks "
                       "and binary files are skipped.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    (void)tok_help;
    kiln_ctx *ctx = cli_ctx_new();
    kiln_tokenizer *tok = NULL;
    kiln_status s = kiln_tokenizer_load(ctx, spec, &tok);
    if (s) {
        rc = cli_fail(ctx, "tokenize", s);
        goto done;
    }
    if (dataset) {
        rc = check_datasets(ctx, tok, dataset, &inputs, max_len, o.skip_bad);
        goto done;
    }
    if (!o.out_dir) {
        fprintf(stderr, "kiln tokenize: --out is required (see kiln tokenize --help)\n");
        rc = 2;
        goto done;
    }
    if ((s = check_data_out(ctx, o.out_dir, &inputs))) {
        rc = cli_fail(ctx, "tokenize", s);
        goto done;
    }
    progress_state ps = {.tty = isatty(STDERR_FILENO) != 0};
    o.tokenizer_spec = spec;
    o.inputs = inputs.items;
    o.n_inputs = inputs.n;
    o.threads = threads;
    if (!quiet) {
        o.progress = tokenize_progress;
        o.progress_ud = &ps;
    }
    kiln_tokenize_stats st;
    s = kiln_tokenize_corpus(ctx, tok, &o, &st);
    if (s) {
        rc = cli_fail(ctx, "tokenize", s);
        goto done;
    }
    char b[32];
    human_bytes(b, sizeof b, (double)st.bytes);
    printf("tokenized %lld files (%s, %lld documents) in %.1fs: %lld train tokens in %d "
           "file%s, %lld val tokens in %d file%s -> %s\n",
           (long long)st.files, b, (long long)st.docs, st.seconds,
           (long long)st.train_tokens, st.train_files, st.train_files == 1 ? "" : "s",
           (long long)st.val_tokens, st.val_files, st.val_files == 1 ? "" : "s", o.out_dir);
    if (st.bad_lines)
        printf("skipped %lld malformed JSONL lines\n", (long long)st.bad_lines);
done:
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return rc;
}
