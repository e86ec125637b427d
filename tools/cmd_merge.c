/*
 * cmd_merge.c — `kiln merge`: a PEFT LoRA adapter merged into its base
 * (PEFT's merge_and_unload: W += (lora_alpha / r) B A, transposed for
 * gpt2's Conv1D), written as a model directory every command loads
 * (config.json, model.safetensors, the base's tokenizer.json and
 * tokenizer_config.json), or with --gguf-type as one GGUF file
 * (kiln_gguf_export, the writer of kiln export/quantize). docs/finetuning.md
 * has a worked example.
 */
#include "cli.h"

#include <stdio.h>
#include <string.h>

int cmd_merge(int argc, char **argv)
{
    const char *model = NULL, *adapter = NULL, *out = NULL, *gguf_type = NULL;
    const char *tok_spec = NULL;
    int threads = 0;
    cli_opt opts[] = {
        {"model", CLI_STR, &model, "base model directory (or run directory: its latest checkpoint, or a .gguf file)", true},
        {"adapter", CLI_STR, &adapter, "PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors; e.g. a kiln sft --lora-rank checkpoint)", true},
        {"out", CLI_STR, &out, "output model directory (or, with --gguf-type, the .gguf file)", true},
        {"gguf-type", CLI_STR, &gguf_type, "write one GGUF file of this type instead: f32 | f16 | bf16 | q8_0 | q4_0 | q4_k_m | q6_k [off]", false},
        {"tokenizer", CLI_STR, &tok_spec, "tokenizer to copy (a tokenizer.json, a model directory, or bytes) [the base's]", false},
        {"threads", CLI_INT, &threads, "compute threads, 0 = all cores [0]", false},
        {NULL, 0, NULL, NULL, false}};
    int rc = cli_parse("merge", "merge --model BASE --adapter DIR --out DIR [--gguf-type TYPE]",
                       "Merges a LoRA adapter into its base model: W += (lora_alpha/r) B A on\n"
                       "every adapted module (PEFT's merge_and_unload), so the result runs\n"
                       "without the adapter at the base's speed. The adapter's tensors are\n"
                       "checked against the base (an adapter for another base is refused,\n"
                       "naming the tensor and both shapes).",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    static const char *const types[] = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k",
                                        NULL};
    int ti = 0;
    while (gguf_type && types[ti] && strcmp(types[ti], gguf_type)) ti++;
    if (gguf_type && !types[ti]) {
        fprintf(stderr, "kiln merge: --gguf-type: '%s' is not one of f32 | f16 | bf16 | q8_0 | "
                        "q4_0 | q4_k_m | q6_k\n", gguf_type);
        cli_free(opts, NULL);
        return 2;
    }
    kiln_ctx *ctx = kiln_ctx_new();
    if (threads > 0) kiln_set_threads(ctx, threads);
    char dir[4096];
    kiln_model *m = NULL;
    kiln_tokenizer *tok = NULL;
    kiln_status s = cli_model_dir(ctx, model, dir, sizeof dir);
    if (!s) s = kiln_checkpoint_verify(ctx, dir);
    if (!s) s = kiln_model_load(ctx, dir, &m);
    if (!s && kiln_model_config(m)->lora_rank > 0)
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "--model: '%s' has LoRA adapters of its own (a LoRA run's checkpoint); "
                      "give the base the run started from", dir);
    if (!s) s = kiln_model_load_adapter(ctx, &m, adapter);
    if (!s) {
        const kiln_config *c = kiln_model_config(m);
        printf("adapter: r %d, lora_alpha %g over %s (%s)\n", c->lora_rank, c->lora_alpha,
               dir, c->arch == KILN_ARCH_GPT2 ? "gpt2" : "llama");
        s = kiln_model_merge_lora(ctx, &m);
    }
    if (!s) {
        s = kiln_tokenizer_load(ctx, tok_spec ? tok_spec : dir, &tok);
        if (s && !tok_spec)
            s = kiln_fail(ctx, s, "%s (pass --tokenizer)", kiln_errmsg(ctx));
    }
    if (!s && gguf_type) {
        kiln_gguf_export_opts o = kiln_gguf_export_opts_default();
        o.type = gguf_type;
        o.name = model;
        kiln_gguf_export_stats st = {0};
        s = kiln_gguf_export(ctx, m, tok, out, &o, &st);
        kiln_gguf_export_stats_free(&st);
        if (!s) printf("merged: %s (GGUF, %s)\n", out, gguf_type);
    } else if (!s) {
        char tp[4200];
        snprintf(tp, sizeof tp, "%s/tokenizer.json", out);
        s = kiln_model_save(ctx, m, out);
        if (!s) s = kiln_tokenizer_save(ctx, tok, tp);
        if (!s) s = kiln_tokenizer_save_chat_config(ctx, tok, out);
        if (!s) printf("merged: %s (config.json, model.safetensors, tokenizer.json)\n", out);
    }
    rc = s ? cli_fail(ctx, "merge", s) : 0;
    kiln_tokenizer_free(tok);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return rc;
}
