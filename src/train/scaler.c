/*
 * scaler.c — dynamic loss scaling (torch.amp.GradScaler semantics); see
 * scaler.h for the protocol of one step.
 */
#include "train/scaler.h"

#include <math.h>

kiln_scaler scaler_default(bool enabled)
{
    return (kiln_scaler){
        .enabled = enabled,
        .scale = enabled ? 65536.0 : 1.0,
        .growth_factor = 2.0,
        .backoff_factor = 0.5,
        .growth_interval = 2000,
    };
}

float scaler_loss_scale(const kiln_scaler *s)
{
    return s->enabled ? (float)s->scale : 1.0f;
}

float scaler_inv_scale(const kiln_scaler *s)
{
    /* torch multiplies by the fp32 reciprocal of the scale. */
    return s->enabled ? (float)(1.0 / s->scale) : 1.0f;
}

bool scaler_unscale(const kiln_scaler *s, float *grads, size_t n)
{
    float inv = scaler_inv_scale(s);
    int bad = 0;
    if (inv == 1.0f) {
        #pragma omp parallel for reduction(| : bad) schedule(static)
        for (size_t i = 0; i < n; i++) bad |= !isfinite(grads[i]);
    } else {
        #pragma omp parallel for reduction(| : bad) schedule(static)
        for (size_t i = 0; i < n; i++) {
            float g = grads[i] * inv;
            grads[i] = g;
            bad |= !isfinite(g);
        }
    }
    return bad != 0;
}

bool scaler_update(kiln_scaler *s, bool found_inf)
{
    s->last_found_inf = found_inf;
    if (!s->enabled) return true;
    if (found_inf) {
        s->scale *= s->backoff_factor;
        s->growth_tracker = 0;
        s->skipped_steps++;
        return false;
    }
    if (++s->growth_tracker >= s->growth_interval) {
        double g = s->scale * s->growth_factor;
        if (isfinite(g)) s->scale = g; /* torch: grow only to a finite scale */
        s->growth_tracker = 0;
    }
    return true;
}

bool scaler_warn_low(const kiln_scaler *s, double *warned)
{
    if (!s->enabled || !(s->scale < 1.0)) return false;
    if (*warned > 0 && s->scale > *warned / 10.0) return false;
    *warned = s->scale;
    return true;
}

json_t *scaler_to_json(const kiln_scaler *s)
{
    return json_pack("{s:b, s:f, s:f, s:f, s:i, s:i, s:I}", "enabled", s->enabled,
                     "scale", s->scale, "growth_factor", s->growth_factor,
                     "backoff_factor", s->backoff_factor, "growth_interval",
                     s->growth_interval, "growth_tracker", s->growth_tracker,
                     "skipped_steps", (json_int_t)s->skipped_steps);
}

kiln_status scaler_from_json(kiln_ctx *ctx, const json_t *obj, const char *what,
                             kiln_scaler *out)
{
    if (!json_is_object(obj))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: the loss scaler state must be a JSON object",
                         what);
    kiln_scaler s = scaler_default(true);
    kiln_status st;
    int64_t gi = s.growth_interval, gt = 0, sk = 0;
    if ((st = js_get_bool(ctx, obj, "enabled", what, false, &s.enabled)) ||
        (st = js_get_double(ctx, obj, "scale", what, true, &s.scale)) ||
        (st = js_get_double(ctx, obj, "growth_factor", what, false, &s.growth_factor)) ||
        (st = js_get_double(ctx, obj, "backoff_factor", what, false, &s.backoff_factor)) ||
        (st = js_get_int(ctx, obj, "growth_interval", what, false, &gi)) ||
        (st = js_get_int(ctx, obj, "growth_tracker", what, false, &gt)) ||
        (st = js_get_int(ctx, obj, "skipped_steps", what, false, &sk)))
        return st;
    if (!(s.scale > 0) || !isfinite(s.scale))
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "%s: scaler \"scale\" is %g; it must be a positive finite number "
                         "(delete the field to restart from 65536)",
                         what, s.scale);
    if (!(s.growth_factor > 1) || !(s.backoff_factor > 0 && s.backoff_factor < 1))
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "%s: scaler growth_factor must be > 1 and backoff_factor in (0, 1)", what);
    if (gi < 1 || gi > 1000000000 || gt < 0 || gt > gi || sk < 0)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "%s: scaler growth_interval must be >= 1 and growth_tracker in "
                         "[0, growth_interval]",
                         what);
    s.growth_interval = (int)gi;
    s.growth_tracker = (int)gt;
    s.skipped_steps = sk;
    *out = s;
    return KILN_OK;
}
