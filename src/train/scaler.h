/*
 * scaler.h — dynamic loss scaling with torch.amp.GradScaler's semantics,
 * for fp16 training (bf16 and fp32 run it disabled: scale 1, never skips).
 *
 * One optimizer step with a scaler:
 *   1. backward with the loss multiplied by scaler_loss_scale() (e.g. as
 *      the grad_scale of kiln_cross_entropy);
 *   2. [data parallel: all-reduce the gradients first; an inf/NaN on any
 *      rank then reaches every rank, so all ranks agree — or reduce the
 *      found_inf flag with MPI_MAX when reducing unscaled gradients];
 *   3. found_inf = scaler_unscale(s, grads, n): gradients *= 1/scale and
 *      inf/NaN detection, before clipping and before the optimizer;
 *   4. apply = scaler_update(s, found_inf): when false skip the optimizer
 *      step (the gradients are garbage); the scale has been halved.
 *      Otherwise step; after growth_interval consecutive clean steps the
 *      scale doubles.
 * Fused form (what the trainer runs; same arithmetic, no pass that
 * rewrites the gradients): norm = kiln_l2_norm(grads) of the still-scaled
 * gradients is the inf/NaN check (non-finite exactly when some gradient
 * is), apply = scaler_update(s, !isfinite(norm)), and the optimizer reads
 * each gradient times scaler_inv_scale(s) (taken before the update) times
 * the clip coefficient of norm * inv_scale via kiln_adamw_step_scaled. The
 * scale is a power of two, so the unscale stays exact and still happens
 * before the clip.
 * The state is plain data and round-trips through JSON (trainer_state.json)
 * so a resumed run continues the same scale and growth counter.
 */
#ifndef KILN_TRAIN_SCALER_H
#define KILN_TRAIN_SCALER_H

#include "base/base.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kiln_scaler {
    bool enabled;
    double scale;          /* current loss scale (torch: _scale) */
    double growth_factor;  /* 2.0 */
    double backoff_factor; /* 0.5 */
    int growth_interval;   /* 2000 */
    int growth_tracker;    /* consecutive clean steps since the last change */
    int64_t skipped_steps; /* total steps skipped for inf/NaN */
    bool last_found_inf;   /* the most recent update's verdict */
} kiln_scaler;

/* torch defaults: init 65536, x2 every 2000 clean steps, x0.5 on inf. */
kiln_scaler scaler_default(bool enabled);

/* The factor to multiply the loss (or dlogits) by: scale, or 1 when
 * disabled. */
float scaler_loss_scale(const kiln_scaler *s);

/* The factor scaler_unscale multiplies gradients by: the fp32 reciprocal
 * of the scale, or 1 when disabled. */
float scaler_inv_scale(const kiln_scaler *s);

/* Multiplies grads[0..n) by 1/scale (no-op when disabled) and reports
 * whether any gradient is inf or NaN (checked even when disabled, so a
 * caller can still refuse to step on a non-finite gradient). */
bool scaler_unscale(const kiln_scaler *s, float *grads, size_t n);

/* Records the step's verdict and updates the scale. Returns true when the
 * optimizer step should be applied. Disabled: always true, no change. */
bool scaler_update(kiln_scaler *s, bool found_inf);

/* Whether the scale (after an update) calls for the warning that it fell
 * below 1: a scale below 1 means the gradients overflow fp16 even
 * unscaled, i.e. the run is diverging. True the first time the scale is
 * below 1 and again each time it has fallen another factor of 10 below
 * the scale last warned at (*warned: that scale, 0 = never; updated), so
 * a diverging run warns a few times, not at every skipped step. */
bool scaler_warn_low(const kiln_scaler *s, double *warned);

/* State as a JSON object {"enabled","scale","growth_factor",
 * "backoff_factor","growth_interval","growth_tracker","skipped_steps"}.
 * Returns NULL on OOM. */
json_t *scaler_to_json(const kiln_scaler *s);
/* Reads the object written by scaler_to_json; `what` names the source for
 * errors (e.g. "run/trainer_state.json: scaler"). Missing optional fields
 * keep their defaults; a non-positive or non-finite scale is rejected. */
kiln_status scaler_from_json(kiln_ctx *ctx, const json_t *obj, const char *what,
                             kiln_scaler *out);

#endif /* KILN_TRAIN_SCALER_H */
