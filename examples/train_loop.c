/*
 * train_loop.c — a training loop written by hand on kiln.h, the way a
 * PyTorch user writes one: a model, an optimizer, a data loader (random
 * windows of a text file, byte tokenizer), forward, loss, backward,
 * clipping, step. `kiln train` does the same with checkpoints, schedules,
 * evaluation and data parallelism on top.
 *
 *   build/examples/train_loop [TEXT_FILE] [STEPS]
 *
 * Prints the loss every 10 steps and "first=<loss> last=<loss>" at the end
 * (tests/t_examples.sh checks the loss falls).
 */
#include "kiln.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int die(kiln_ctx *ctx, const char *what)
{
    fprintf(stderr, "train_loop: %s: %s\n", what, kiln_errmsg(ctx));
    return 1;
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "/usr/share/games/fortunes/fortunes";
    int steps = argc > 2 ? atoi(argv[2]) : 100;
    enum { B = 8, T = 64 };

    kiln_ctx *ctx = kiln_ctx_new();
    if (!ctx) return 1;

    /* Data: the whole file as byte tokens. */
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "train_loop: cannot open '%s'\n", path);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)len + 1);
    if (!text || fread(text, 1, (size_t)len, f) != (size_t)len) return 1;
    fclose(f);
    kiln_tokenizer *tok;
    if (kiln_tokenizer_load(ctx, "bytes", &tok)) return die(ctx, "tokenizer");
    int32_t *ids;
    size_t n_ids;
    if (kiln_tokenizer_encode(ctx, tok, text, (size_t)len, &ids, &n_ids))
        return die(ctx, "encode");
    if (n_ids < (size_t)(T + 1) * B) {
        fprintf(stderr, "train_loop: '%s' is too short\n", path);
        return 1;
    }

    /* Model: a small GPT-2 over the byte vocabulary. */
    kiln_config cfg = kiln_config_default();
    cfg.n_layer = 2;
    cfg.n_embd = 128;
    cfg.n_head = 4;
    cfg.n_kv_head = 4;
    cfg.n_inner = 512;
    cfg.n_ctx = T;
    cfg.vocab_size = kiln_tokenizer_vocab_size(tok);
    kiln_model *model;
    if (kiln_model_new(ctx, &cfg, &model)) return die(ctx, "model");
    kiln_model_init_random(model, 1234);
    if (kiln_model_prepare(ctx, model, B, T)) return die(ctx, "prepare");

    /* Optimizer: AdamW with decay on the matrices only. */
    kiln_adamw_opts aopts = kiln_adamw_opts_default();
    kiln_adamw *opt;
    if (kiln_adamw_new_for_model(ctx, model, &aopts, &opt))
        return die(ctx, "optimizer");

    int32_t inputs[B * T], targets[B * T];
    kiln_rng rng;
    kiln_rng_seed(&rng, 42);
    size_t n_params = kiln_model_num_params(model);
    double first = 0, last = 0;
    for (int step = 0; step < steps; step++) {
        /* Draw B random windows of T+1 tokens. */
        for (int b = 0; b < B; b++) {
            size_t start = kiln_rng_below(&rng, n_ids - T - 1);
            for (int t = 0; t < T; t++) {
                inputs[b * T + t] = ids[start + t];
                targets[b * T + t] = ids[start + t + 1];
            }
        }
        float *logits;
        if (kiln_model_forward(ctx, model, inputs, B, T, &logits))
            return die(ctx, "forward");
        /* Loss and its gradient, written over the logits in place. */
        double loss_sum = 0, count = 0;
        if (kiln_cross_entropy(ctx, logits, targets, NULL, B * T,
                               cfg.vocab_size, 1.0f / (B * T), logits,
                               &loss_sum, &count))
            return die(ctx, "loss");
        double loss = loss_sum / count;
        kiln_model_zero_grad(model);
        if (kiln_model_backward(ctx, model, logits)) return die(ctx, "backward");
        const float *grads = kiln_model_grads(model);
        /* clip to norm 1 inside the update (the gradients stay as they are) */
        double norm = kiln_l2_norm(grads, n_params);
        double lr = kiln_lr_at(KILN_SCHEDULE_COSINE, 3e-3, 3e-4, 10, steps, step);
        kiln_model_adamw_step(model, opt, grads, (float)lr, kiln_clip_grad_coef(norm, 1.0));
        if (step == 0) first = loss;
        last = loss;
        if (step % 10 == 0 || step == steps - 1)
            printf("step %4d  loss %.4f  grad_norm %.3f  lr %.2e\n", step,
                   loss, norm, lr);
    }
    printf("first=%.4f last=%.4f\n", first, last);

    kiln_adamw_free(opt);
    kiln_model_free(model);
    free(ids);
    free(text);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
    return 0;
}
