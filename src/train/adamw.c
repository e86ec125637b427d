/*
 * adamw.c — the AdamW optimizer: moments for the trainable ranges of a
 * parameter block only (frozen parameters have no state and are never
 * written), parameter groups (learning-rate multiplier and decoupled
 * weight decay per group; "decay" / "no_decay" by default), global-norm
 * gradient clipping, learning-rate schedules, and the optimizer-state
 * file (optimizer.safetensors).
 *
 * Everything here is elementwise or reduced in a fixed order, so results
 * do not depend on the OpenMP thread count.
 */
#include "train/adamw.h"

#include "base/base.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__)
#include "kernels/kernels.h" /* kern_cpu_avx512 */
#include <immintrin.h>
#define KILN_OPT_X86 1
#endif

/* A trainable range of the parameter block: its moments lie at
 * m + so .. m + so + numel (frozen parameters have none), its settings are
 * group g's. Ranges are disjoint and sorted; the moments are back to back
 * in range order. */
typedef struct prange {
    size_t offset, numel;
    size_t so;
    int g;
} prange;

/* A parameter group's resolved settings. 0 is "no_decay", 1 "decay". */
typedef struct pgroup {
    char name[64];
    float lr_mul, wd;
} pgroup;

#define ADAMW_GROUPS 16

struct kiln_adamw {
    kiln_adamw_opts opts;
    size_t n;  /* parameters (the block, frozen included) */
    size_t ns; /* floats per moment: the trainable ones */
    int64_t t;
    float *m; /* (ns) first moment */
    float *v; /* (ns) second moment */
    prange *ranges;
    int nranges;
    pgroup grp[ADAMW_GROUPS];
    int ngrp;
    /* made for a model: every tensor's name and whether it has state, for
     * the check of optimizer.safetensors at load; NULL otherwise */
    char **names;
    bool *trainable;
    int nnames;
    adamw_matrix *mats;  /* adamw_matrix_scratch */
    int mats_cap;
};

kiln_adamw_opts kiln_adamw_opts_default(void)
{
    return (kiln_adamw_opts){
        .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f,
        .kernel = KILN_OPTIM_KERNEL_AUTO};
}

/* The group named name (added with its settings from o->opts if new);
 * -1 when there are too many. */
static int group_of(kiln_adamw *o, const char *name)
{
    for (int g = 0; g < o->ngrp; g++)
        if (!strcmp(o->grp[g].name, name)) return g;
    if (o->ngrp == ADAMW_GROUPS) return -1;
    pgroup *p = &o->grp[o->ngrp];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->lr_mul = 1.0f;
    p->wd = !strcmp(name, "decay") ? o->opts.weight_decay : 0.0f;
    for (int i = 0; i < o->opts.n_groups; i++)
        if (!strcmp(o->opts.groups[i].name, name)) {
            p->lr_mul = o->opts.groups[i].lr_mul;
            p->wd = o->opts.groups[i].weight_decay;
        }
    return o->ngrp++;
}

/* The checks of opts->kernel and opts->groups that need no model. */
static kiln_status opts_check(kiln_ctx *ctx, const kiln_adamw_opts *op)
{
    if (op->kernel != KILN_OPTIM_KERNEL_AUTO && op->kernel != KILN_OPTIM_KERNEL_PORTABLE)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_adamw_opts.kernel = %d is not one of "
                         "KILN_OPTIM_KERNEL_AUTO, KILN_OPTIM_KERNEL_PORTABLE",
                         (int)op->kernel);
    if (op->n_groups < 0 || op->n_groups > KILN_ADAMW_MAX_GROUPS)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_adamw_opts.n_groups = %d is outside [0, %d]", op->n_groups,
                         KILN_ADAMW_MAX_GROUPS);
    for (int i = 0; i < op->n_groups; i++) {
        const kiln_adamw_group *g = &op->groups[i];
        if (!g->name || !*g->name || strlen(g->name) > 63)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_adamw_opts.groups[%d].name is empty or longer than 63 "
                             "characters", i);
        if (!(g->lr_mul >= 0.0f) || !isfinite(g->lr_mul))
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_adamw_opts.groups[%d].lr_mul = %g (group \"%s\") is not "
                             "a finite number >= 0", i, (double)g->lr_mul, g->name);
        if (!(g->weight_decay >= 0.0f) || !isfinite(g->weight_decay))
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_adamw_opts.groups[%d].weight_decay = %g (group \"%s\") is "
                             "not a finite number >= 0", i, (double)g->weight_decay, g->name);
        for (int j = 0; j < i; j++)
            if (!strcmp(op->groups[j].name, g->name))
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                 "kiln_adamw_opts.groups[%d] and groups[%d] both name group "
                                 "\"%s\"", j, i, g->name);
    }
    return KILN_OK;
}

/* An optimizer with ns floats of state over n parameters, ranges to be
 * filled by the caller; groups 0 and 1 set up. */
static kiln_status adamw_alloc(kiln_ctx *ctx, size_t n, size_t ns, int nranges,
                               const kiln_adamw_opts *opts, kiln_adamw **out)
{
    *out = NULL;
    kiln_adamw_opts op = opts ? *opts : kiln_adamw_opts_default();
    kiln_status s = opts_check(ctx, &op);
    if (s) return s;
    kiln_adamw *o = kiln_calloc(ctx, 1, sizeof *o);
    if (!o) return KILN_ERR_NOMEM;
    o->opts = op;
    o->n = n;
    o->ns = ns;
    o->m = kiln_aligned_alloc(ctx, ns * sizeof(float));
    o->v = kiln_aligned_alloc(ctx, ns * sizeof(float));
    o->ranges = kiln_calloc(ctx, (size_t)KILN_MAX(nranges, 1), sizeof *o->ranges);
    if (!o->m || !o->v || !o->ranges) {
        kiln_adamw_free(o);
        return KILN_ERR_NOMEM;
    }
    group_of(o, "no_decay");
    group_of(o, "decay");
    *out = o;
    return KILN_OK;
}

kiln_status kiln_adamw_new(kiln_ctx *ctx, size_t n,
                           const kiln_adamw_opts *opts, kiln_adamw **out)
{
    *out = NULL;
    if (n == 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "AdamW over 0 parameters");
    kiln_adamw *o;
    kiln_status s = adamw_alloc(ctx, n, n, 1, opts, &o);
    if (s) return s;
    for (int i = 0; i < o->opts.n_groups; i++) {
        const char *g = o->opts.groups[i].name;
        if (strcmp(g, "decay") && strcmp(g, "no_decay")) {
            kiln_adamw_free(o);
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_adamw_opts.groups[%d].name = \"%s\": an optimizer made "
                             "with kiln_adamw_new has only the groups \"decay\" and "
                             "\"no_decay\" (kiln_adamw_new_for_model knows the model's)",
                             i, g);
        }
    }
    o->ranges[0] = (prange){0, n, 0, 0};
    o->nranges = 1;
    *out = o;
    return KILN_OK;
}

void kiln_adamw_free(kiln_adamw *o)
{
    if (!o) return;
    free(o->m);
    free(o->v);
    free(o->ranges);
    free(o->mats);
    if (o->names)
        for (int i = 0; i < o->nnames; i++) free(o->names[i]);
    free(o->names);
    free(o->trainable);
    free(o);
}

adamw_matrix *adamw_matrix_scratch(kiln_adamw *o, int n)
{
    if (n > o->mats_cap) {
        adamw_matrix *p = realloc(o->mats, (size_t)n * sizeof *p);
        if (!p) return NULL;
        o->mats = p;
        o->mats_cap = n;
    }
    return o->mats;
}

bool adamw_untouched(void *ud, size_t off, size_t len)
{
    const kiln_adamw *o = ud;
    for (int r = 0; r < o->nranges; r++) {
        const prange *p = &o->ranges[r];
        if (p->offset < off + len && off < p->offset + p->numel) return false;
    }
    return true;
}

/* Appends range x to rs (k of them), merged with the last one when they
 * continue each other in the block and in the moments, in the same group. */
static void push_range(prange *rs, int *k, prange x)
{
    if (*k > 0) {
        prange *l = &rs[*k - 1];
        if (l->g == x.g && l->offset + l->numel == x.offset && l->so + l->numel == x.so) {
            l->numel += x.numel;
            return;
        }
    }
    rs[(*k)++] = x;
}

kiln_status kiln_adamw_set_decay(kiln_ctx *ctx, kiln_adamw *o, size_t offset,
                                 size_t numel, bool decay)
{
    if (offset > o->n || numel > o->n - offset)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "AdamW decay range [%zu, %zu) outside %zu parameters",
                         offset, offset + numel, o->n);
    if (numel == 0) return KILN_OK;
    size_t lo = offset, hi = offset + numel, covered = 0;
    for (int i = 0; i < o->nranges; i++) {
        size_t a = KILN_MAX(lo, o->ranges[i].offset);
        size_t b = KILN_MIN(hi, o->ranges[i].offset + o->ranges[i].numel);
        if (a < b) covered += b - a;
    }
    if (covered != numel)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "AdamW decay range [%zu, %zu) includes frozen parameters (they have "
                         "no optimizer state)", lo, hi);
    /* Split ranges at lo and hi, then set the group. */
    prange *nr = kiln_malloc(ctx, ((size_t)o->nranges + 2) * sizeof *nr);
    if (!nr) return KILN_ERR_NOMEM;
    int k = 0, g = decay ? 1 : 0;
    for (int i = 0; i < o->nranges; i++) {
        prange r = o->ranges[i];
        size_t a = r.offset, b = r.offset + r.numel;
        size_t cuts[4] = {a, lo > a && lo < b ? lo : a, hi > a && hi < b ? hi : a, b};
        size_t pts[4];
        int np = 0;
        for (int c = 0; c < 4; c++)
            if (np == 0 || cuts[c] > pts[np - 1]) pts[np++] = cuts[c];
        for (int c = 0; c + 1 < np; c++) {
            prange piece = {pts[c], pts[c + 1] - pts[c], r.so + (pts[c] - a), r.g};
            if (piece.offset >= lo && piece.offset < hi) piece.g = g;
            push_range(nr, &k, piece);
        }
    }
    free(o->ranges);
    o->ranges = nr;
    o->nranges = k;
    return KILN_OK;
}

kiln_status kiln_adamw_new_for_model(kiln_ctx *ctx, const kiln_model *m,
                                     const kiln_adamw_opts *opts,
                                     kiln_adamw **out)
{
    *out = NULL;
    int nt = kiln_model_num_tensors(m);
    size_t ns = kiln_model_num_trainable(m);
    if (ns == 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "every tensor of the model is frozen: nothing for AdamW to train "
                         "(kiln_model_set_trainable / kiln_train_opts.freeze)");
    kiln_adamw *o;
    kiln_status s = adamw_alloc(ctx, kiln_model_num_params(m), ns, nt, opts, &o);
    if (s) return s;
    o->names = calloc((size_t)nt, sizeof *o->names);
    o->trainable = calloc((size_t)nt, sizeof *o->trainable);
    if (!o->names || !o->trainable) goto nomem;
    o->nnames = nt;
    size_t so = 0;
    int k = 0;
    for (int i = 0; i < nt; i++) {
        const kiln_tensor_info *ti = kiln_model_tensor(m, i);
        if (!(o->names[i] = strdup(ti->name))) goto nomem;
        o->trainable[i] = ti->trainable;
        if (!ti->trainable) continue;
        int g = group_of(o, ti->group ? ti->group : (ti->decay ? "decay" : "no_decay"));
        if (g < 0) {
            kiln_adamw_free(o);
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "the model's tensors are in more than %d parameter groups "
                             "(kiln_model_set_group)", ADAMW_GROUPS);
        }
        push_range(o->ranges, &k, (prange){ti->offset, ti->numel, so, g});
        so += ti->numel;
    }
    o->nranges = k;
    for (int i = 0; i < o->opts.n_groups; i++) {
        bool found = false;
        for (int g = 0; g < o->ngrp && !found; g++)
            for (int r = 0; r < k && !found; r++)
                found = o->ranges[r].g == g && !strcmp(o->grp[g].name, o->opts.groups[i].name);
        if (!found) {
            kiln_status e = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                      "kiln_adamw_opts.groups[%d].name = \"%s\" is the group of "
                                      "no trainable tensor (groups are kiln_tensor_info.group: "
                                      "\"decay\", \"no_decay\" or kiln_model_set_group's)",
                                      i, o->opts.groups[i].name);
            kiln_adamw_free(o);
            return e;
        }
    }
    *out = o;
    return KILN_OK;
nomem:
    kiln_adamw_free(o);
    return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
}

/* ---- the update kernel ---------------------------------------------- */

/* Per-step constants of the update, hoisted out of the element loop. */
typedef struct adamw_k {
    float gmul;       /* grad_mul: unscale x clip coefficient */
    float b1, omb1;   /* beta1, 1 - beta1 */
    float b2, omb2;   /* beta2, 1 - beta2 */
    float rsbc2;      /* 1 / sqrt(1 - beta2^t) */
    float eps;
    float step;       /* lr / (1 - beta1^t) */
} adamw_k;

/* One element, in the order every path uses (no FMA: C11 mode compiles
 * with -ffp-contract=off, and the AVX-512 path spells out mul + add, so
 * both paths give the same bits):
 *   g = G gmul;  m = b1 m + (1-b1) g;  v = b2 v + ((1-b2) g) g;
 *   p = p - (step (m / (sqrt(v) rsbc2 + eps)) + lrwd p)
 * which is torch's AdamW (p *= 1 - lr wd; p -= lr/bc1 m / (sqrt(v) /
 * sqrt(bc2) + eps)) with the bias corrections hoisted into step and rsbc2:
 * one sqrt and one division per element. Subtracting the decay and the
 * step together rounds p once, as the unfused loop did. */
static void adamw_portable(float *restrict p, const float *restrict g,
                           float *restrict m, float *restrict v, size_t n,
                           const adamw_k *k, float lrwd)
{
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] * k->gmul;
        float mi = k->b1 * m[i] + k->omb1 * gi;
        float vi = k->b2 * v[i] + k->omb2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float d = sqrtf(vi) * k->rsbc2 + k->eps;
        p[i] = p[i] - (k->step * (mi / d) + lrwd * p[i]);
    }
}

#if KILN_OPT_X86
#define OPT_T512 __attribute__((target("avx512f")))

OPT_T512 static inline void adamw16(float *p, const float *g, float *m, float *v,
                                    __mmask16 k16, const adamw_k *k, __m512 lrwd)
{
    __m512 gi = _mm512_mul_ps(_mm512_maskz_loadu_ps(k16, g), _mm512_set1_ps(k->gmul));
    __m512 mi = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(k->b1), _mm512_maskz_loadu_ps(k16, m)),
                              _mm512_mul_ps(_mm512_set1_ps(k->omb1), gi));
    __m512 vi = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(k->b2), _mm512_maskz_loadu_ps(k16, v)),
                              _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(k->omb2), gi), gi));
    _mm512_mask_storeu_ps(m, k16, mi);
    _mm512_mask_storeu_ps(v, k16, vi);
    __m512 d = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), _mm512_set1_ps(k->rsbc2)),
                             _mm512_set1_ps(k->eps));
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(k->step), _mm512_div_ps(mi, d));
    __m512 p0 = _mm512_maskz_loadu_ps(k16, p);
    __m512 pi = _mm512_sub_ps(p0, _mm512_add_ps(u, _mm512_mul_ps(p0, lrwd)));
    _mm512_mask_storeu_ps(p, k16, pi);
}

OPT_T512 static void adamw_avx512(float *p, const float *g, float *m, float *v, size_t n,
                                  const adamw_k *k, float lrwd)
{
    const __m512 dv = _mm512_set1_ps(lrwd);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        /* 1 KiB ahead on each stream: ~10-15% over the hardware
         * prefetcher alone on this bandwidth-bound loop (bench_optim) */
        _mm_prefetch((const char *)(g + i) + 1024, _MM_HINT_T0);
        _mm_prefetch((const char *)(m + i) + 1024, _MM_HINT_T0);
        _mm_prefetch((const char *)(v + i) + 1024, _MM_HINT_T0);
        _mm_prefetch((const char *)(p + i) + 1024, _MM_HINT_T0);
        adamw16(p + i, g + i, m + i, v + i, 0xffff, k, dv);
    }
    if (i < n)
        adamw16(p + i, g + i, m + i, v + i, (__mmask16)((1u << (n - i)) - 1), k, dv);
}
#endif

/* AVX-512 when the CPU has it, unless kernel k is
 * KILN_OPTIM_KERNEL_PORTABLE. */
static bool use_avx512(kiln_optim_kernel k)
{
#if KILN_OPT_X86
    return kern_cpu_avx512() && k != KILN_OPTIM_KERNEL_PORTABLE;
#else
    (void)k;
    return false;
#endif
}

int kiln_optim_kernel_parse(const char *name)
{
    if (name && !strcmp(name, "auto")) return KILN_OPTIM_KERNEL_AUTO;
    if (name && !strcmp(name, "portable")) return KILN_OPTIM_KERNEL_PORTABLE;
    return -1;
}

const char *kiln_adamw_kernel_name(const kiln_adamw *o)
{
    return use_avx512(o->opts.kernel) ? "avx512" : "portable";
}

typedef void (*adamw_fn)(float *, const float *, float *, float *, size_t,
                         const adamw_k *, float);

static adamw_fn adamw_kernel(const kiln_adamw *o)
{
#if KILN_OPT_X86
    if (use_avx512(o->opts.kernel)) return adamw_avx512;
#endif
    (void)o;
    return adamw_portable;
}

/* Counts step t and returns each group's constants: k[g], and in lrwd[g]
 * lr_g * weight decay, where lr_g = lr * lr_mul (lr itself for lr_mul 1,
 * so the default groups give the bits of a single learning rate). */
static void adamw_begin(kiln_adamw *o, float lr, float grad_mul, adamw_k *k, float *lrwd)
{
    o->t++;
    const double b1 = o->opts.beta1, b2 = o->opts.beta2;
    const double bc1 = 1.0 - pow(b1, (double)o->t);
    const double bc2 = 1.0 - pow(b2, (double)o->t);
    for (int g = 0; g < o->ngrp; g++) {
        float lrg = o->grp[g].lr_mul == 1.0f ? lr : (float)((double)lr * o->grp[g].lr_mul);
        lrwd[g] = (float)((double)lrg * (double)o->grp[g].wd);
        k[g] = (adamw_k){
            .gmul = grad_mul,
            .b1 = o->opts.beta1, .omb1 = 1.0f - o->opts.beta1,
            .b2 = o->opts.beta2, .omb2 = 1.0f - o->opts.beta2,
            .rsbc2 = (float)(1.0 / sqrt(bc2)),
            .eps = o->opts.eps,
            .step = (float)((double)lrg / bc1),
        };
    }
}

/* The pieces of the trainable ranges outside the matrices marked done
 * (mats sorted by offset, each inside one range), in order: calls
 * visit(ud, a, b, range) for each piece [a, b) that overlaps [lo, hi) in
 * "gap space" (positions counted over the pieces only), clipped to it;
 * returns the gap total. Frozen parameters are in no range: never visited. */
typedef struct gap_walk {
    const prange *rg;
    int nr;
    const adamw_matrix *mats;
    int nm;
} gap_walk;

static size_t walk_gaps(const gap_walk *w, size_t lo, size_t hi,
                        void (*visit)(void *, size_t, size_t, const prange *), void *ud)
{
    size_t pos = 0; /* gap-space position of the next piece */
    int j = 0;
    for (int r = 0; r < w->nr; r++) {
        size_t a = w->rg[r].offset, end = a + w->rg[r].numel;
        while (a < end) {
            while (j < w->nm && (!w->mats[j].done || w->mats[j].offset < a)) j++;
            size_t b = end;
            if (j < w->nm && w->mats[j].offset < end) b = w->mats[j].offset;
            if (b > a && visit) {
                size_t s = KILN_MAX(lo, pos), e = KILN_MIN(hi, pos + (b - a));
                if (s < e) visit(ud, a + (s - pos), a + (e - pos), &w->rg[r]);
            }
            pos += b - a;
            a = b;
            if (j < w->nm && w->mats[j].offset == b && b < end) {
                a = b + (size_t)w->mats[j].rows * (size_t)w->mats[j].cols;
                j++;
            }
        }
    }
    return pos;
}

typedef struct step_args {
    float *p;
    const float *g;
    float *m, *v;
    const adamw_k *k;  /* per group */
    const float *lrwd; /* per group */
    adamw_fn fn;
} step_args;

static void step_piece(void *ud, size_t a, size_t b, const prange *r)
{
    const step_args *s = ud;
    size_t so = r->so + (a - r->offset);
    s->fn(s->p + a, s->g + a, s->m + so, s->v + so, b - a, &s->k[r->g], s->lrwd[r->g]);
}

void adamw_step_matrices(kiln_adamw *o, float *params, const float *grads, float lr,
                         float grad_mul, adamw_matrix *mats, int nmats)
{
    float lrwd[ADAMW_GROUPS];
    adamw_k k[ADAMW_GROUPS];
    adamw_begin(o, lr, grad_mul, k, lrwd);
    step_args sa = {params, grads, o->m, o->v, k, lrwd, adamw_kernel(o)};
    /* Which matrices go strip by strip: in order, inside [0, n) and one
     * trainable range, rows a multiple of their strip. The others are
     * plain parameters to this step (done = false). */
    int units = 0;
    size_t prev_end = 0;
    for (int i = 0; i < nmats; i++) {
        adamw_matrix *a = &mats[i];
        size_t numel = (size_t)a->rows * (size_t)a->cols;
        a->done = false;
        if (a->rows <= 0 || a->cols <= 0 || a->strip <= 0 || a->rows % a->strip ||
            a->offset < prev_end || a->offset > o->n || numel > o->n - a->offset)
            continue;
        for (int r = 0; r < o->nranges; r++) {
            const prange *d = &o->ranges[r];
            if (a->offset >= d->offset && a->offset < d->offset + d->numel) {
                a->done = a->offset + numel <= d->offset + d->numel;
                a->range = r;
                break;
            }
        }
        if (!a->done) continue;
        prev_end = a->offset + numel;
        a->unit0 = units;
        units += a->rows / a->strip;
    }
    gap_walk gw = {o->ranges, o->nranges, mats, nmats};
    const size_t gaps = walk_gaps(&gw, 0, 0, NULL, NULL);
    /* One parallel region: the strips, each updated then handed to its
     * matrix's `after` while its rows are still in cache, go to whichever
     * thread is free; then the rest as kiln_adamw_step_scaled splits it
     * (a contiguous share of the pieces per thread). */
#pragma omp parallel if (o->ns > 65536)
    {
        int nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        int cur = 0;
#pragma omp for schedule(dynamic, 1) nowait
        for (int u = 0; u < units; u++) {
            /* A thread's units usually come in increasing order, but
             * OpenMP does not promise it (LLVM's runtime steals chunks
             * from other threads' ranges): start over on a lower one. */
            if (mats[cur].done && u < mats[cur].unit0) cur = 0;
            while (!mats[cur].done || u >= mats[cur].unit0 + mats[cur].rows / mats[cur].strip)
                cur++;
            const adamw_matrix *a = &mats[cur];
            const prange *r = &o->ranges[a->range];
            int r0 = (u - a->unit0) * a->strip;
            size_t off = a->offset + (size_t)r0 * (size_t)a->cols;
            size_t so = r->so + (off - r->offset);
            sa.fn(params + off, grads + off, o->m + so, o->v + so,
                  (size_t)a->strip * (size_t)a->cols, &k[r->g], lrwd[r->g]);
            a->after(a->ud, params + a->offset, r0);
        }
        size_t per = ((gaps + (size_t)nt - 1) / (size_t)nt + 15) & ~(size_t)15;
        size_t lo = KILN_MIN(gaps, (size_t)id * per), hi = KILN_MIN(gaps, lo + per);
        if (lo < hi) walk_gaps(&gw, lo, hi, step_piece, &sa);
    }
}

void kiln_adamw_step_scaled(kiln_adamw *o, float *params, const float *grads,
                            float lr, float grad_mul)
{
    adamw_step_matrices(o, params, grads, lr, grad_mul, NULL, 0);
}

void kiln_adamw_step(kiln_adamw *o, float *params, const float *grads,
                     float lr)
{
    kiln_adamw_step_scaled(o, params, grads, lr, 1.0f);
}

size_t kiln_adamw_size(const kiln_adamw *o) { return o->n; }
size_t kiln_adamw_state_size(const kiln_adamw *o) { return o->ns; }
int64_t kiln_adamw_t(const kiln_adamw *o) { return o->t; }
void kiln_adamw_set_t(kiln_adamw *o, int64_t t) { o->t = t; }
float *kiln_adamw_m(kiln_adamw *o) { return o->m; }
float *kiln_adamw_v(kiln_adamw *o) { return o->v; }

/* ---- norms and clipping --------------------------------------------- */

#define NORM_BLOCK 16384

/* Sum of squares of one block (n <= NORM_BLOCK) in double, in 16 lanes
 * (element i goes to lane i % 16), the lanes then added in order. Both
 * paths do exactly this, so they give the same bits. */
static double sumsq_portable(const float *x, size_t n)
{
    double lane[16] = {0};
    for (size_t i = 0; i < n; i++) lane[i % 16] += (double)x[i] * (double)x[i];
    double s = 0;
    for (int j = 0; j < 8; j++) s += lane[j] + lane[j + 8];
    return s;
}

#if KILN_OPT_X86
OPT_T512 static double sumsq_avx512(const float *x, size_t n)
{
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    size_t i = 0;
    for (;; i += 16) {
        __m512 v;
        if (i + 16 <= n) {
            /* a single read stream: the prefetch keeps more misses in
             * flight than the hardware prefetcher does (~25% faster) */
            _mm_prefetch((const char *)(x + i) + 2048, _MM_HINT_T0);
            v = _mm512_loadu_ps(x + i);
        }
        else if (i < n)
            v = _mm512_maskz_loadu_ps((__mmask16)((1u << (n - i)) - 1), x + i);
        else
            break;
        __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        lo = _mm512_add_pd(lo, _mm512_mul_pd(a, a));
        hi = _mm512_add_pd(hi, _mm512_mul_pd(b, b));
    }
    double l[8], h[8];
    _mm512_storeu_pd(l, lo);
    _mm512_storeu_pd(h, hi);
    double s = 0;
    for (int j = 0; j < 8; j++) s += l[j] + h[j];
    return s;
}
#endif

double kiln_l2_norm(const float *x, size_t n)
{
    return adamw_l2_norm_with(x, n, KILN_OPTIM_KERNEL_AUTO);
}

double adamw_l2_norm_with(const float *x, size_t n, kiln_optim_kernel k)
{
    double (*fn)(const float *, size_t) = sumsq_portable;
#if KILN_OPT_X86
    if (use_avx512(k)) fn = sumsq_avx512;
#else
    (void)k;
#endif
    /* Blocks of NORM_BLOCK summed in parallel, 64 at a time (no allocation:
     * this runs inside the training step), then added in block order: the
     * same bits whatever the thread count. */
    size_t nb = (n + NORM_BLOCK - 1) / NORM_BLOCK;
    double part[64], total = 0;
    for (size_t g = 0; g < nb; g += 64) {
        ptrdiff_t ng = (ptrdiff_t)KILN_MIN(nb - g, (size_t)64);
#pragma omp parallel for schedule(static) if (ng > 4)
        for (ptrdiff_t b = 0; b < ng; b++) {
            size_t a = (g + (size_t)b) * NORM_BLOCK;
            part[b] = fn(x + a, KILN_MIN(n - a, NORM_BLOCK));
        }
        for (ptrdiff_t b = 0; b < ng; b++) total += part[b];
    }
    return sqrt(total);
}

float kiln_clip_grad_coef(double norm, double max_norm)
{
    if (max_norm <= 0 || !(norm > max_norm)) return 1.0f;
    return (float)(max_norm / (norm + 1e-6));
}

float kiln_clip_grad_norm(float *x, size_t n, double norm, double max_norm)
{
    float f = kiln_clip_grad_coef(norm, max_norm);
    if (f == 1.0f) return f;
#pragma omp parallel for schedule(static)
    for (ptrdiff_t i = 0; i < (ptrdiff_t)n; i++) x[i] *= f;
    return f;
}

/* ---- schedules ------------------------------------------------------ */

int kiln_schedule_parse(const char *name)
{
    if (!name) return -1;
    if (!strcmp(name, "cosine")) return KILN_SCHEDULE_COSINE;
    if (!strcmp(name, "linear")) return KILN_SCHEDULE_LINEAR;
    if (!strcmp(name, "constant")) return KILN_SCHEDULE_CONSTANT;
    return -1;
}

const char *kiln_schedule_name(kiln_schedule s)
{
    switch (s) {
    case KILN_SCHEDULE_COSINE: return "cosine";
    case KILN_SCHEDULE_LINEAR: return "linear";
    case KILN_SCHEDULE_CONSTANT: return "constant";
    }
    return "?";
}

double kiln_lr_at(kiln_schedule s, double lr, double min_lr, int64_t warmup,
                  int64_t total, int64_t step)
{
    if (warmup > 0 && step < warmup) return lr * (double)(step + 1) / (double)warmup;
    if (s == KILN_SCHEDULE_CONSTANT) return lr;
    int64_t span = total - warmup - 1;
    double p = span > 0 ? (double)(step - warmup) / (double)span : 1.0;
    if (p < 0) p = 0;
    if (p > 1) p = 1;
    if (s == KILN_SCHEDULE_LINEAR) return lr + (min_lr - lr) * p;
    return min_lr + 0.5 * (1.0 + cos(M_PI * p)) * (lr - min_lr);
}

/* optimizer.safetensors: adamw_io.c */

const float *adamw_moment(const kiln_adamw *o, bool second) { return second ? o->v : o->m; }

int adamw_tensors(const kiln_adamw *o, char *const **names, const bool **trainable)
{
    *names = o->names;
    *trainable = o->trainable;
    return o->names ? o->nnames : 0;
}
