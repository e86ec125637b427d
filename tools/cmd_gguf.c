/*
 * cmd_gguf.c — `kiln export --format gguf`, `kiln quantize` (one GGUF file
 * that llama.cpp runs, in a plain or a quantized type; the same writer,
 * kiln_gguf_export) and `kiln import` (a GGUF file back to a model
 * directory kiln trains from). docs/quantize.md has a worked example.
 */
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define TYPES "f32 | f16 | bf16 | q8_0 | q4_0 | q4_k_m | q6_k"

typedef struct bar {
    bool on;
    double t0;
} bar;

/* The progress bar on a terminal: tensors done, elapsed, ETA (by tensor
 * count), the tensor being converted. */
static void progress(void *ud, int i, int n, const char *tensor)
{
    bar *b = ud;
    if (!b->on) return;
    if (i == 0) b->t0 = kiln_time_now();
    double el = kiln_time_now() - b->t0, eta = i > 0 ? el * (n - i) / i : 0;
    int w = 30, k = n ? i * w / n : w;
    fprintf(stdout, "\r[%.*s%.*s] %d/%d %5.1fs ETA %5.1fs %-32.32s", k,
            "##############################", w - k, "..............................", i, n, el,
            eta, tensor);
    if (i == n) fputc('\n', stdout);
    fflush(stdout);
}

static void print_summary(const char *cmd, const char *out, const char *type,
                          const kiln_gguf_export_stats *st, bool all)
{
    printf("%s %s: %s, %d tensors\n", cmd, out, type, st->n_tensors);
    printf("  size      %.2f MiB fp32 -> %.2f MiB of tensors (%.2fx smaller), file %.2f MiB\n",
           (double)st->bytes_before / (1 << 20), (double)st->bytes_after / (1 << 20),
           st->bytes_after ? (double)st->bytes_before / (double)st->bytes_after : 0.0,
           (double)st->file_bytes / (1 << 20));
    printf("  weights   %llu elements, %.3f bits per weight\n", (unsigned long long)st->weights,
           st->bits_per_weight);
    /* per type: count, bytes, and the names unless it is the majority */
    kiln_dtype seen[16];
    int ns = 0, best = 0, best_n = 0;
    for (int i = 0; i < st->n_tensors; i++) {
        int j = 0;
        while (j < ns && seen[j] != st->tensors[i].dtype) j++;
        if (j == ns && ns < 16) seen[ns++] = st->tensors[i].dtype;
    }
    for (int j = 0; j < ns; j++) {
        int c = 0;
        for (int i = 0; i < st->n_tensors; i++) c += st->tensors[i].dtype == seen[j];
        if (c > best_n) {
            best_n = c;
            best = j;
        }
    }
    for (int j = 0; j < ns; j++) {
        int c = 0;
        uint64_t bytes = 0, el = 0;
        for (int i = 0; i < st->n_tensors; i++)
            if (st->tensors[i].dtype == seen[j]) {
                c++;
                bytes += st->tensors[i].bytes;
                el += st->tensors[i].numel;
            }
        printf("  %-6s %4d tensors, %10.3f MiB, %6.3f bits/weight", kiln_dtype_name(seen[j]), c,
               (double)bytes / (1 << 20), el ? 8.0 * (double)bytes / (double)el : 0.0);
        bool one_d = true;
        for (int i = 0; i < st->n_tensors; i++)
            if (st->tensors[i].dtype == seen[j] && st->tensors[i].ne[1] > 1) one_d = false;
        if (one_d) {
            printf(" (norms and biases)\n");
        } else if (j != best || ns == 1) {
            printf(j == best ? " (all matrices)\n" : ":");
            if (j != best) {
                int k = 0;
                for (int i = 0; i < st->n_tensors; i++)
                    if (st->tensors[i].dtype == seen[j] && st->tensors[i].ne[1] > 1)
                        printf("%s %s", k++ ? "," : "", st->tensors[i].name);
                printf("\n");
            }
        } else {
            printf(" (the other matrices)\n");
        }
    }
    for (int i = 0; i < st->n_tensors; i++) {
        const kiln_gguf_tensor_summary *t = &st->tensors[i];
        if (t->dtype != t->wanted)
            printf("  fallback  %s: %s -> %s (row length %lld is not a multiple of %s's block)\n",
                   t->name, kiln_dtype_name(t->wanted), kiln_dtype_name(t->dtype),
                   (long long)t->ne[0], kiln_dtype_name(t->wanted));
    }
    if (all)
        for (int i = 0; i < st->n_tensors; i++) {
            const kiln_gguf_tensor_summary *t = &st->tensors[i];
            printf("  %-32s [%lld, %lld] %-5s %zu bytes\n", t->name, (long long)t->ne[0],
                   (long long)t->ne[1], kiln_dtype_name(t->dtype), t->bytes);
        }
}

/* --calib: perplexity of the model before and after on held-out tokens
 * (a data directory's val split, else its train split). */
static kiln_status calibrate(kiln_ctx *ctx, kiln_model *before, const char *out,
                             const char *data, int64_t max_tokens, const char *type)
{
    kiln_data *d = NULL;
    kiln_model *after = NULL;
    int32_t *ids = NULL;
    kiln_status s = kiln_data_open(ctx, data, &d);
    if (s) return kiln_fail(ctx, s, "--calib: %s", kiln_errmsg(ctx));
    const kiln_config *c = kiln_model_config(before);
    kiln_split sp = kiln_data_tokens(d, KILN_SPLIT_VAL) >= 2 ? KILN_SPLIT_VAL : KILN_SPLIT_TRAIN;
    size_t n = kiln_data_tokens(d, sp);
    if (max_tokens > 0 && (size_t)max_tokens < n) n = (size_t)max_tokens;
    if (kiln_data_vocab_size(d) > c->vocab_size)
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "--calib: the data in '%s' has vocab_size %d but the model %d", data,
                      kiln_data_vocab_size(d), c->vocab_size);
    else if (n < 2)
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG, "--calib: '%s' holds no tokens", data);
    else if (!(ids = malloc(n * sizeof *ids)))
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!s) {
        kiln_data_read(d, sp, 0, n, ids);
        s = kiln_model_load(ctx, out, &after);
    }
    double l0 = 0, c0 = 0, l1 = 0, c1 = 0;
    int T = c->n_ctx < 256 ? c->n_ctx : 256;
    if (!s) s = kiln_eval_tokens(ctx, before, ids, n, 4, T, &l0, &c0);
    if (!s) s = kiln_eval_tokens(ctx, after, ids, n, 4, T, &l1, &c1);
    if (!s) {
        double p0 = exp(l0 / c0), p1 = exp(l1 / c1);
        printf("  calib     %s (%s split, %.0f tokens, seq %d): perplexity %.4f (fp32) -> "
               "%.4f (%s), %+.2f%%\n", data, sp == KILN_SPLIT_VAL ? "val" : "train", c0, T, p0,
               p1, type, 100.0 * (p1 / p0 - 1.0));
    }
    free(ids);
    kiln_model_free(after);
    kiln_data_close(d);
    return s;
}

/* export and quantize: the same flags, the same writer. */
static int run_export(const char *cmd, int argc, char **argv, bool quantize)
{
    const char *model = NULL, *out = NULL, *type = quantize ? NULL : "f32", *tok_spec = NULL,
               *name = NULL, *format = NULL, *calib = NULL;
    int64_t calib_tokens = 32768;
    int threads = 0;
    bool quiet = false, tensors = false;
    cli_opt eopts[] = {
        {"format", CLI_STR, &format, "output format: gguf", true},
        {"model", CLI_STR, &model, "model directory, run directory or .gguf file", true},
        {"out", CLI_STR, &out, "the .gguf file to write", true},
        {"type", CLI_STR, &type, "tensor type: " TYPES " [f32]", false},
        {"tokenizer", CLI_STR, &tok_spec, "tokenizer.json, directory or \"bytes\" [the model's]", false},
        {"name", CLI_STR, &name, "general.name [the model path]", false},
        {"tensors", CLI_BOOL, &tensors, "list every tensor with its type", false},
        {"threads", CLI_INT, &threads, "OpenMP threads, 0 = all cores [0]", false},
        {"quiet", CLI_BOOL, &quiet, "no progress bar or summary", false},
        {NULL, 0, NULL, NULL, false},
    };
    cli_opt qopts[] = {
        {"model", CLI_STR, &model, "model directory, run directory or .gguf file", true},
        {"type", CLI_STR, &type, TYPES " (q4_k_m: llama.cpp's mix)", true},
        {"out", CLI_STR, &out, "the .gguf file to write", true},
        {"tokenizer", CLI_STR, &tok_spec, "tokenizer.json, directory or \"bytes\" [the model's]", false},
        {"name", CLI_STR, &name, "general.name [the model path]", false},
        {"tensors", CLI_BOOL, &tensors, "list every tensor with its type", false},
        {"calib", CLI_STR, &calib, "data directory (kiln tokenize): perplexity before and after on its val split", false},
        {"calib-tokens", CLI_I64, &calib_tokens, "tokens of --calib to evaluate, 0 = all [32768]", false},
        {"threads", CLI_INT, &threads, "OpenMP threads, 0 = all cores [0]", false},
        {"quiet", CLI_BOOL, &quiet, "no progress bar or summary", false},
        {NULL, 0, NULL, NULL, false},
    };
    int rc = quantize
                 ? cli_parse(cmd, "quantize --model DIR --type T --out FILE.gguf",
                             "Writes the model and its tokenizer as one GGUF file in type T\n"
                             "(llama.cpp, Ollama, LM Studio and node-llama-cpp run it; so do\n"
                             "kiln generate/chat/serve/eval). Prints a summary: bytes before\n"
                             "and after, bits per weight, which tensors got which type.",
                             qopts, argc, argv, NULL)
                 : cli_parse(cmd, "export --format gguf --model DIR --out FILE.gguf [--type T]",
                             "Writes the model and its tokenizer as one GGUF file (the same\n"
                             "writer as kiln quantize).", eopts, argc, argv, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (calib_tokens < 0) {
        fprintf(stderr, "kiln %s: --calib-tokens must be >= 0\n", cmd);
        return 2;
    }
    if (!quantize && strcmp(format, "gguf")) {
        fprintf(stderr, "kiln export: --format: '%s' is not a supported format (gguf)\n", format);
        return 2;
    }
    static const char *const ok[] = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k", NULL};
    int ti = 0;
    while (ok[ti] && strcmp(ok[ti], type)) ti++;
    if (!ok[ti]) {
        fprintf(stderr, "kiln %s: --type: '%s' is not one of " TYPES "\n", cmd, type);
        return 2;
    }
    kiln_ctx *ctx = kiln_ctx_new();
    if (threads > 0) kiln_set_threads(ctx, threads);
    char dir[4096];
    kiln_model *m = NULL;
    kiln_tokenizer *tok = NULL;
    kiln_gguf_export_stats st = {0};
    kiln_status s = cli_model_dir(ctx, model, dir, sizeof dir);
    if (!s) s = kiln_model_load(ctx, dir, &m);
    if (!s) {
        s = kiln_tokenizer_load(ctx, tok_spec ? tok_spec : dir, &tok);
        if (s && !tok_spec)
            s = kiln_fail(ctx, s, "%s (pass --tokenizer, e.g. --tokenizer bytes)", kiln_errmsg(ctx));
    }
    bar b = {.on = !quiet && quantize && cli_isatty()};
    if (!s) {
        kiln_gguf_export_opts o = kiln_gguf_export_opts_default();
        o.type = type;
        o.name = name ? name : model;
        o.progress = progress;
        o.progress_ud = &b;
        s = kiln_gguf_export(ctx, m, tok, out, &o, &st);
    }
    if (!s && !quiet) print_summary(quantize ? "quantized" : "exported", out, type, &st, tensors);
    if (!s && calib) s = calibrate(ctx, m, out, calib, calib_tokens, type);
    if (s) rc = cli_fail(ctx, cmd, s);
    kiln_gguf_export_stats_free(&st);
    kiln_tokenizer_free(tok);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    return rc;
}

int cmd_export(int argc, char **argv) { return run_export("export", argc, argv, false); }

int cmd_quantize(int argc, char **argv) { return run_export("quantize", argc, argv, true); }

int cmd_import(int argc, char **argv)
{
    const char *out = NULL, *in = NULL;
    bool force = false;
    cli_opt opts[] = {
        {"model", CLI_STR, &in, "the .gguf file (or give it as the first argument)", false},
        {"out", CLI_STR, &out, "model directory to write", true},
        {"force", CLI_BOOL, &force, "overwrite a model already in --out", false},
        {NULL, 0, NULL, NULL, false},
    };
    cli_list pos = {0};
    int rc = cli_parse("import", "import FILE.gguf --out DIR",
                       "Writes a GGUF model (gpt2 or llama, any type kiln reads) as a model\n"
                       "directory: config.json, model.safetensors (fp32, dequantized; llama's\n"
                       "q/k rows back in Hugging Face order), tokenizer.json and, when the\n"
                       "file has tokenizer.chat_template, tokenizer_config.json. kiln trains,\n"
                       "tunes and generates from it.", opts, argc, argv, &pos);
    if (rc) {
        cli_free(opts, &pos);
        return rc == 1 ? 0 : 2;
    }
    if (!in && pos.n == 1) in = pos.items[0];
    if (!in || pos.n > 1) {
        fprintf(stderr, "kiln import: give one GGUF file (see kiln import --help)\n");
        cli_free(opts, &pos);
        return 2;
    }
    char cj[4200];
    struct stat sb;
    snprintf(cj, sizeof cj, "%s/config.json", out);
    if (!force && stat(cj, &sb) == 0) {
        fprintf(stderr, "kiln import: '%s' already holds a model; choose another --out or "
                        "pass --force\n", out);
        cli_free(opts, &pos);
        return 1;
    }
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_model *m = NULL;
    kiln_tokenizer *tok = NULL;
    struct stat is;
    kiln_status s = KILN_OK;
    if (stat(in, &is) != 0 || !S_ISREG(is.st_mode))
        s = kiln_fail(ctx, KILN_ERR_IO, "'%s' is not a file (kiln import reads a .gguf file)", in);
    if (!s) s = kiln_model_load(ctx, in, &m);
    if (!s) s = kiln_tokenizer_load(ctx, in, &tok);
    if (!s) s = kiln_model_save(ctx, m, out);
    char tj[4200];
    snprintf(tj, sizeof tj, "%s/tokenizer.json", out);
    if (!s) s = kiln_tokenizer_save(ctx, tok, tj);
    if (!s) s = kiln_tokenizer_save_chat_config(ctx, tok, out); /* its chat template */
    if (s) rc = cli_fail(ctx, "import", s);
    else {
        const kiln_config *c = kiln_model_config(m);
        printf("imported %s -> %s: %s, %d layers, width %d, vocab %d, %zu parameters\n", in, out,
               c->arch == KILN_ARCH_GPT2               ? "gpt2"
               : c->hf_type == KILN_HF_TYPE_QWEN2   ? "qwen2"
               : c->hf_type == KILN_HF_TYPE_MISTRAL ? "mistral"
                                                    : "llama",
               c->n_layer, c->n_embd,
               c->vocab_size, kiln_model_num_params(m));
    }
    kiln_tokenizer_free(tok);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    cli_free(opts, &pos);
    return rc;
}
