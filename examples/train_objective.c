/*
 * train_objective.c — a training objective of one's own, run by the
 * library's trainer (kiln_train_opts.objective): label-smoothed
 * cross-entropy, PyTorch's F.cross_entropy(..., label_smoothing=eps),
 *
 *   loss_i     = -(1-e) log p[y_i] - (e/V) sum_j log p[j]
 *   dloss_i/dx = p_i - (1-e) onehot(y_i) - e/V
 *
 * The trainer hands it each micro-batch's logits and the scale to apply
 * (1 / the step's token count, times fp16's loss scale); it returns the
 * loss sum and writes dlogits in place. Everything else (batches,
 * accumulation, AdamW, clipping, checkpoints, metrics.jsonl) is
 * kiln_train's.
 *
 *   kiln tokenize --tokenizer bytes --input FILES --out data
 *   build/examples/train_objective CONFIG.json data RUN [steps] [eps]
 */
#include "kiln.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    double eps;
} smoothing;

static kiln_status smoothed_ce(void *user, kiln_ctx *ctx, const kiln_objective_batch *b,
                               const float *logits, float grad_scale, float *dlogits,
                               double *loss_sum, double *weight_sum)
{
    (void)ctx;
    double e = ((const smoothing *)user)->eps;
    int V = b->V;
    for (int i = 0; i < b->B * b->T; i++) {
        const float *x = logits + (size_t)i * V;
        float *d = dlogits + (size_t)i * V; /* == x: read the row first */
        int y = b->targets[i];
        if (y < 0) { /* no loss here */
            for (int j = 0; j < V; j++) d[j] = 0;
            continue;
        }
        double mx = x[0], z = 0, sum_x = 0;
        for (int j = 1; j < V; j++) mx = fmax(mx, x[j]);
        for (int j = 0; j < V; j++) z += exp(x[j] - mx), sum_x += x[j];
        double lz = mx + log(z), xy = x[y];
        *loss_sum += (1 - e) * (lz - xy) + e * (lz - sum_x / V);
        *weight_sum += 1;
        for (int j = 0; j < V; j++) {
            double g = exp(x[j] - lz) - e / V - (j == y ? 1 - e : 0);
            d[j] = (float)(grad_scale * g);
        }
    }
    return KILN_OK;
}

static bool report(void *user, const kiln_step_info *s)
{
    (void)user;
    if (s->step == 1 || s->step % 20 == 0 || s->step == s->total)
        printf("step %lld/%lld loss %.4f grad_norm %.3f\n", (long long)s->step,
               (long long)s->total, s->loss, s->grad_norm);
    return true;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: train_objective CONFIG.json DATA RUN [steps] [eps]\n");
        return 2;
    }
    smoothing sm = {.eps = argc > 5 ? atof(argv[5]) : 0.1};
    kiln_objective obj = {
        .name = "label_smoothing", /* recorded in trainer_state.json */
        .fused_ce = false,         /* not plain CE: call .loss */
        .weigh = NULL,             /* every token counts once */
        .loss = smoothed_ce,
        .user = &sm,
    };
    kiln_train_opts o = kiln_train_opts_default();
    o.config = argv[1];
    o.data = argv[2];
    o.out = argv[3];
    o.steps = argc > 4 ? atoi(argv[4]) : 60;
    o.batch = 8;
    o.seq = 64;
    o.grad_accum = 2;
    o.lr = 3e-3;
    o.warmup = 10;
    o.eval_every = o.steps; /* validation loss: plain cross-entropy */
    o.save_every = 0;
    o.progress = KILN_PROGRESS_NONE;
    o.objective = &obj;
    o.on_step = report;
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_result res;
    kiln_status s = kiln_train(ctx, &o, &res);
    if (s) {
        fprintf(stderr, "train_objective: %s\n", kiln_errmsg(ctx));
        kiln_ctx_free(ctx);
        return 1;
    }
    printf("done: step %lld, loss %.4f (label smoothing %.2f), val_loss %.4f (cross-entropy)\n",
           (long long)res.step, res.loss, sm.eps, res.val_loss);
    printf("checkpoint: %s\n", res.checkpoint);
    kiln_ctx_free(ctx);
    return 0;
}
