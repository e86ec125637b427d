/*
 * distill.c — knowledge distillation's loss (forward KL, reverse KL,
 * generalized JSD at a temperature, mixed with the data's cross-entropy)
 * and the trainer objective that asks a teacher for its logits.
 *
 * Every quantity of a row is derived from the two log-softmaxes at
 * temperature tau, recomputed per vocabulary entry from the row's
 * log-sum-exps instead of stored (no scratch of V per thread). With
 * z = student / tau, q = softmax(z), p = softmax(teacher / tau) and a
 * divergence D(q) whose gradient with respect to q is g, the chain rule
 * through the softmax gives dD/dz_j = q_j (g_j - sum_k q_k g_k), and
 * d/dstudent = (1/tau) d/dz; times tau^2 (the loss's scale) that is
 * tau * dD/dz:
 *   forward KL(p||q):  dD/dz_j = q_j - p_j
 *   reverse KL(q||p):  g_k = log(q_k/p_k) + 1, so dD/dz_j = q_j (log(q_j/p_j) - KL)
 *   JSD (m = b p + (1-b) q):  dD/dq_k = (1-b) log(q_k/m_k) (the other terms
 *   cancel), so dD/dz_j = q_j (g_j - sum_k q_k g_k) with that g.
 */
#include "kiln.h"
#include "base/base.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int kiln_kd_loss_parse(const char *name)
{
    if (!name) return -1;
    if (!strcmp(name, "forward")) return KILN_KD_FORWARD;
    if (!strcmp(name, "reverse")) return KILN_KD_REVERSE;
    if (!strcmp(name, "jsd")) return KILN_KD_JSD;
    return -1;
}

const char *kiln_kd_loss_name(kiln_kd_loss k)
{
    switch (k) {
    case KILN_KD_FORWARD: return "forward";
    case KILN_KD_REVERSE: return "reverse";
    case KILN_KD_JSD: return "jsd";
    }
    return "?";
}

kiln_kd_opts kiln_kd_opts_default(void)
{
    return (kiln_kd_opts){.loss = KILN_KD_FORWARD, .temperature = 1.0, .alpha = 0.5, .beta = 0.5};
}

kiln_status kiln_kd_opts_validate(kiln_ctx *ctx, const kiln_kd_opts *o)
{
    if (kiln_kd_loss_name(o->loss)[0] == '?')
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_kd_opts.loss = %d is not one of forward, reverse, jsd",
                         (int)o->loss);
    if (!(o->temperature > 0 && o->temperature <= 1e3))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_kd_opts.temperature = %g must be in (0, 1000] (1 = the "
                         "distributions as they are; 2 to 4 soften them)", o->temperature);
    if (!(o->alpha >= 0 && o->alpha <= 1))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_kd_opts.alpha = %g must be in [0, 1] (the weight of the data's "
                         "cross-entropy; 0 = distillation only)", o->alpha);
    if (!(o->beta >= 0 && o->beta <= 1))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_kd_opts.beta = %g must be in [0, 1] (the teacher's share of "
                         "the JSD's mixture)", o->beta);
    return KILN_OK;
}

/* max and log-sum-exp of x / tau, in double. */
static double row_lse(const float *x, int V, double inv_tau)
{
    double mx = -INFINITY;
    for (int j = 0; j < V; j++) mx = (double)x[j] * inv_tau > mx ? (double)x[j] * inv_tau : mx;
    double sum = 0;
    for (int j = 0; j < V; j++) sum += exp((double)x[j] * inv_tau - mx);
    return mx + log(sum);
}

/* The divergence kind a row computes: JSD at beta 0 or 1 is the KL it
 * tends to (the mixture's formula would give 0 there). */
static kiln_kd_loss effective_kind(const kiln_kd_opts *o)
{
    if (o->loss != KILN_KD_JSD) return o->loss;
    if (o->beta == 0) return KILN_KD_FORWARD;
    if (o->beta == 1) return KILN_KD_REVERSE;
    return KILN_KD_JSD;
}

/* x log(x / y) with 0 log 0 = 0. */
static double xlogxy(double x, double logx, double logy) { return x > 0 ? x * (logx - logy) : 0; }

/* log(b e^lp + (1-b) e^lq) for the JSD's mixture, stable. */
static double log_mix(double lp, double lq, double logb, double log1mb)
{
    double a = logb + lp, c = log1mb + lq, hi = a > c ? a : c;
    if (hi == -INFINITY) return -INFINITY;
    return hi + log(exp(a - hi) + exp(c - hi));
}

/* One row's terms: with d non-NULL writes
 *   k * [(1 - alpha) tau dD/dz + alpha (softmax(s) - onehot(y))]
 * there (see the top of the file); s may alias d (each d_j is written
 * after the last read of s_j). Returns D(p, q); *ce gets the data's
 * cross-entropy -log softmax(s)[y] (temperature 1; 0 when alpha is 0). */
typedef struct kd_row_args {
    kiln_kd_loss kind;
    double beta, tau, alpha;
} kd_row_args;

static double kd_row(const kd_row_args *r, const float *s, const float *t, int y, int V,
                     float *d, double k, double *ce)
{
    const double tau = r->tau, beta = r->beta, a = r->alpha, it = 1.0 / tau;
    const kiln_kd_loss kind = r->kind;
    const double ls = row_lse(s, V, it), lt = row_lse(t, V, it);
    const double ls1 = a > 0 ? (tau == 1 ? ls : row_lse(s, V, 1.0)) : 0;
    *ce = a > 0 ? ls1 - (double)s[y] : 0;
    const double logb = kind == KILN_KD_JSD ? log(beta) : 0,
                 log1mb = kind == KILN_KD_JSD ? log1p(-beta) : 0;
    double D = 0, G = 0; /* the divergence; sum_k q_k g_k */
    for (int j = 0; j < V; j++) {
        double lq = (double)s[j] * it - ls, lp = (double)t[j] * it - lt;
        double q = exp(lq), p = exp(lp);
        if (kind == KILN_KD_FORWARD) {
            D += xlogxy(p, lp, lq);
        } else if (kind == KILN_KD_REVERSE) {
            D += xlogxy(q, lq, lp);
        } else {
            double lm = log_mix(lp, lq, logb, log1mb);
            D += beta * xlogxy(p, lp, lm) + (1 - beta) * xlogxy(q, lq, lm);
            G += q > 0 ? q * (1 - beta) * (lq - lm) : 0;
        }
    }
    if (kind == KILN_KD_REVERSE) G = D;
    if (!d) return D;
    const double kkd = k * (1 - a) * tau, kce = k * a;
    for (int j = 0; j < V; j++) {
        double lq = (double)s[j] * it - ls, lp = (double)t[j] * it - lt;
        double q = exp(lq), g;
        if (kind == KILN_KD_FORWARD) {
            g = q - exp(lp);
        } else if (kind == KILN_KD_REVERSE) {
            g = q > 0 ? q * ((lq - lp) - G) : 0;
        } else {
            double lm = log_mix(lp, lq, logb, log1mb);
            g = q > 0 ? q * ((1 - beta) * (lq - lm) - G) : 0;
        }
        double gce = a > 0 ? exp((double)s[j] - ls1) - (j == y ? 1.0 : 0.0) : 0;
        d[j] = (float)(kkd * g + kce * gce);
    }
    return D;
}

kiln_status kiln_kd_loss_rows(kiln_ctx *ctx, const kiln_kd_opts *o, const float *student,
                              const float *teacher, const int32_t *targets,
                              const float *weights, int64_t N, int V, float grad_scale,
                              float *dlogits, double *loss_sum, double *weight_sum)
{
    kiln_status st = kiln_kd_opts_validate(ctx, o);
    if (st) return st;
    if (N < 0 || V < 1)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "distillation loss: bad sizes N=%lld V=%d",
                         (long long)N, V);
    for (int64_t i = 0; i < N; i++)
        if (targets[i] >= V)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "target token id %d at row %lld is outside the vocabulary "
                             "[0, %d)", targets[i], (long long)i, V);
    const kd_row_args r = {effective_kind(o), o->beta, o->temperature, o->alpha};
    const double kd_w = (1 - o->alpha) * o->temperature * o->temperature;
    double lsum = 0, wsum = 0;
#pragma omp parallel for schedule(static) reduction(+ : lsum, wsum)
    for (int64_t i = 0; i < N; i++) {
        float *d = dlogits ? dlogits + i * V : NULL;
        const int y = targets[i];
        if (y < 0) {
            if (d) memset(d, 0, (size_t)V * sizeof *d);
            continue;
        }
        const double w = weights ? (double)weights[i] : 1.0;
        double ce;
        double D = kd_row(&r, student + i * V, teacher + i * V, y, V, d,
                          (double)grad_scale * w, &ce);
        lsum += w * (o->alpha * ce + kd_w * D);
        wsum += w;
    }
    *loss_sum += lsum;
    *weight_sum += wsum;
    return KILN_OK;
}

/* ---- the trainer objective --------------------------------------------- */

struct kiln_distill {
    kiln_objective obj; /* obj.user = this */
    kiln_kd_opts opts;
    int V;
    kiln_teacher_fn teacher;
    void *teacher_user;
    float *tlogits; /* the teacher's logits of the current micro-batch */
    size_t cap;     /* floats tlogits holds */
};

/* The loss's denominator: rows with a target (weighted), as masked CE. */
static kiln_status distill_weigh(void *user, kiln_ctx *ctx, kiln_objective_batch *b,
                                 double *weight)
{
    (void)user;
    (void)ctx;
    int64_t N = (int64_t)b->B * b->T;
    double w = 0;
    for (int64_t i = 0; i < N; i++)
        if (b->targets[i] >= 0) w += b->weights ? (double)b->weights[i] : 1.0;
    *weight += w;
    return KILN_OK;
}

static kiln_status distill_loss(void *user, kiln_ctx *ctx, const kiln_objective_batch *b,
                                const float *logits, float grad_scale, float *dlogits,
                                double *loss_sum, double *weight_sum)
{
    kiln_distill *d = user;
    if (b->V != d->V)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "distillation: the student's logits have %d entries per row, the "
                         "teacher's vocabulary %d", b->V, d->V);
    /* alpha 1 is the data's cross-entropy alone: the teacher is not asked
     * (its divergence term has weight 0; the student's own logits stand in
     * for it, which makes that term exactly 0) */
    const int64_t TV = (int64_t)b->T * b->V;
    if (d->opts.alpha == 1)
        return kiln_kd_loss_rows(ctx, &d->opts, logits, logits, b->targets, b->weights,
                                 (int64_t)b->B * b->T, b->V, grad_scale, dlogits, loss_sum,
                                 weight_sum);
    /* one sequence at a time: the teacher's logits take T x V floats, not
     * B x T x V (with a 150k vocabulary that is the difference between
     * hundreds of MB and gigabytes) */
    if ((size_t)TV > d->cap) {
        float *p = realloc(d->tlogits, (size_t)TV * sizeof *p);
        if (!p)
            return kiln_fail(ctx, KILN_ERR_NOMEM, "distillation: no memory for %lld teacher "
                                                  "logits", (long long)TV);
        d->tlogits = p;
        d->cap = (size_t)TV;
    }
    for (int r = 0; r < b->B; r++) {
        const int64_t o = (int64_t)r * b->T;
        kiln_status s = d->teacher(d->teacher_user, ctx, b->tokens + o, 1, b->T, d->tlogits);
        if (!s)
            s = kiln_kd_loss_rows(ctx, &d->opts, logits + o * b->V, d->tlogits, b->targets + o,
                                  b->weights ? b->weights + o : NULL, b->T, b->V, grad_scale,
                                  dlogits + o * b->V, loss_sum, weight_sum);
        if (s) return s;
    }
    return KILN_OK;
}

kiln_status kiln_distill_new(kiln_ctx *ctx, const kiln_kd_opts *o, int student_vocab,
                             int teacher_vocab, kiln_teacher_fn teacher, void *teacher_user,
                             kiln_distill **out)
{
    *out = NULL;
    kiln_status s = kiln_kd_opts_validate(ctx, o);
    if (s) return s;
    if (!teacher)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_distill_new: no teacher function");
    if (student_vocab != teacher_vocab)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "the teacher's vocabulary has %d tokens and the student's %d: "
                         "distillation compares their next-token distributions entry by "
                         "entry, so both must use the same tokenizer and vocab_size",
                         teacher_vocab, student_vocab);
    kiln_distill *d = kiln_malloc(ctx, sizeof *d);
    if (!d) return KILN_ERR_NOMEM;
    *d = (kiln_distill){
        .obj = {.name = "distill", .fused_ce = false, .weigh = distill_weigh,
                .loss = distill_loss, .user = d},
        .opts = *o,
        .V = student_vocab,
        .teacher = teacher,
        .teacher_user = teacher_user,
    };
    *out = d;
    return KILN_OK;
}

const kiln_objective *kiln_distill_objective(kiln_distill *d) { return &d->obj; }

void kiln_distill_free(kiln_distill *d)
{
    if (!d) return;
    free(d->tlogits);
    free(d);
}
