/*
 * ckpt.h — private interface of checkpoint directories (ckpt.c), used by
 * the trainer.
 */
#ifndef KILN_TRAIN_CKPT_H
#define KILN_TRAIN_CKPT_H

#include "base/base.h"

typedef struct ckpt_save_args {
    const char *run_dir;        /* RUN */
    int64_t step;               /* names RUN/step_%08lld */
    const kiln_model *model;
    const kiln_adamw *opt;
    const json_t *state;        /* trainer_state.json content */
    const char *tokenizer_json; /* copied when it exists; may be NULL */
    int keep_last;              /* remove older step_* beyond this; 0 keep */
    const char *base_model;     /* a LoRA run's base (adapter_config.json) */
    const char *sparsity_json;  /* a pruned model's mark, copied; may be NULL */
} ckpt_save_args;

/* Writes a complete checkpoint atomically (see ckpt.c) and updates
 * RUN/latest. The final directory path goes to out_dir. */
kiln_status ckpt_save(kiln_ctx *ctx, const ckpt_save_args *a, char *out_dir,
                      size_t cap);

#endif
