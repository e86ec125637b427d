/*
 * lora.c — LoRA adapters on the layer's linear products, as PEFT computes
 * them on the unfused HF modules:
 *
 *   y = W x + b + (alpha / r) B (A dropout(x))      A (r, in), B (out, r)
 *
 * kiln fuses llama's q|k|v and gate|up (and gpt2's c_attn is one module):
 * each adapter slot adds to its own columns [off, off + out) of the fused
 * product, so a q_proj adapter touches only the q columns, exactly as PEFT
 * wraps q_proj alone. Each slot has its own dropout mask (PEFT: one
 * nn.Dropout per wrapped module), drawn from a counter-based hash of
 * (seed, layer, slot, element), so the backward regenerates the forward's
 * mask without storing it. The adapters are fp32 and run here in fp32 on
 * the unpacked product input whatever the base's precision: their
 * products are (n, in) x (in, r) with small r, a few percent of the base
 * product's work.
 *
 * The block (block.c) and the backward (pass.c) call model_lora_fwd /
 * model_lora_bwd at each product with adapters; the model object's side
 * (adding adapters, merging, the dropout switch) is at the end.
 */
#include "model/model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const llama_slots[] = {"self_attn.q_proj", "self_attn.k_proj",
                                          "self_attn.v_proj", "self_attn.o_proj",
                                          "mlp.gate_proj",    "mlp.up_proj",
                                          "mlp.down_proj"};
static const char *const gpt2_slots[] = {"attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                         "mlp.c_proj"};

int kiln_lora_num_slots(kiln_arch arch) { return arch == KILN_ARCH_GPT2 ? 4 : 7; }

const char *kiln_lora_slot_name(kiln_arch arch, int s)
{
    if (s < 0 || s >= kiln_lora_num_slots(arch)) return NULL;
    return arch == KILN_ARCH_GPT2 ? gpt2_slots[s] : llama_slots[s];
}

/* The module's last name component ("q_proj", "c_proj"). */
static const char *leaf(const char *path)
{
    const char *d = strrchr(path, '.');
    return d ? d + 1 : path;
}

kiln_status kiln_lora_parse_targets(kiln_ctx *ctx, kiln_arch arch, const char *list,
                                    const char *what, unsigned *mask)
{
    int ns = kiln_lora_num_slots(arch);
    *mask = 0;
    if (!list || !*list)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "%s is empty (give module names such as "
                         "%s or all-linear)", what, arch == KILN_ARCH_GPT2 ? "c_attn,c_proj"
                                                                          : "q_proj,v_proj");
    if (!strcmp(list, "all-linear")) {
        *mask = (1u << ns) - 1;
        return KILN_OK;
    }
    const char *p = list;
    while (*p) {
        size_t len = strcspn(p, ",");
        unsigned got = 0;
        for (int s = 0; s < ns; s++) {
            const char *name = kiln_lora_slot_name(arch, s), *lf = leaf(name);
            /* PEFT matches a module whose name is the entry or ends in
             * ".entry": "c_proj" is both of gpt2's, "mlp.c_proj" one */
            size_t nl = strlen(name);
            bool whole = len == nl && !strncmp(p, name, len);
            bool tail = len == strlen(lf) && !strncmp(p, lf, len);
            if (whole || tail) got |= 1u << s;
        }
        if (!got) {
            char names[200] = "";
            for (int s = 0; s < ns; s++) {
                const char *lf = leaf(kiln_lora_slot_name(arch, s));
                if (strstr(names, lf)) continue;
                strncat(names, lf, sizeof names - strlen(names) - 2);
                strncat(names, " ", sizeof names - strlen(names) - 1);
            }
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "%s: \"%.*s\" is no linear module of a %s model (its modules: "
                             "%sor all-linear)", what, (int)len, p,
                             arch == KILN_ARCH_GPT2 ? "gpt2" : "llama", names);
        }
        *mask |= got;
        p += len;
        if (*p == ',') p++;
    }
    return KILN_OK;
}

model_lora_slot model_lora_slot_of(const kiln_config *c, int s)
{
    int C = c->n_embd, F = c->n_inner, HS = c->n_embd / c->n_head;
    int QH = c->n_head * HS, KH = c->n_kv_head * HS;
    if (c->arch == KILN_ARCH_GPT2) {
        switch (s) {
        case 0: return (model_lora_slot){0, 0, 3 * C, C};
        case 1: return (model_lora_slot){1, 0, C, C};
        case 2: return (model_lora_slot){2, 0, F, C};
        default: return (model_lora_slot){3, 0, C, F};
        }
    }
    switch (s) {
    case 0: return (model_lora_slot){0, 0, QH, C};
    case 1: return (model_lora_slot){0, QH, KH, C};
    case 2: return (model_lora_slot){0, QH + KH, KH, C};
    case 3: return (model_lora_slot){1, 0, C, QH};
    case 4: return (model_lora_slot){2, 0, F, C};
    case 5: return (model_lora_slot){2, F, F, C};
    default: return (model_lora_slot){3, 0, C, F};
    }
}

bool model_lora_has(const kiln_config *c, int lin)
{
    if (c->lora_rank <= 0) return false;
    for (int s = 0; s < kiln_lora_num_slots(c->arch); s++)
        if ((c->lora_targets >> s & 1) && model_lora_slot_of(c, s).lin == lin) return true;
    return false;
}

/* splitmix64: the dropout mask's hash of (seed, layer, slot, element). */
static inline uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The factor of element i of slot s's input: 0 (dropped) or 1/(1-p). */
static inline float keep(const model_lora *lr, uint64_t key, size_t i)
{
    double u = (double)(mix(key ^ mix(i)) >> 11) * 0x1.0p-53;
    return u < lr->p ? 0.0f : 1.0f / (1.0f - lr->p);
}

static uint64_t slot_key(const model_lora *lr, int l, int s)
{
    return mix(lr->seed ^ mix(((uint64_t)l << 8) | (uint64_t)s));
}

/* xd = dropout(x) of slot s (x itself when p == 0). */
static const float *dropped(const model_lora *lr, int l, int s, const float *x, float *buf,
                            size_t len)
{
    if (lr->p <= 0) return x;
    uint64_t key = slot_key(lr, l, s);
#pragma omp parallel for schedule(static) if (len > 65536)
    for (size_t i = 0; i < len; i++) buf[i] = x[i] * keep(lr, key, i);
    return buf;
}

/* h (n, r) = x (n, in) A' (rows of both contiguous) */
static void xa(float *h, const float *x, const float *A, int n, int in, int r)
{
#pragma omp parallel for schedule(static) if ((long)n * in * r > 65536)
    for (int i = 0; i < n; i++)
        for (int k = 0; k < r; k++) {
            const float *xi = x + (size_t)i * in, *ak = A + (size_t)k * in;
            float acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int j = 0; j < in; j++) acc += xi[j] * ak[j];
            h[(size_t)i * r + k] = acc;
        }
}

/* dst (r, out) = B' for B (out, r): rows of out contiguous. */
static const float *transposed(float *dst, const float *B, int out, int r)
{
    for (int o = 0; o < out; o++)
        for (int k = 0; k < r; k++) dst[(size_t)k * out + o] = B[(size_t)o * r + k];
    return dst;
}

void model_lora_fwd(const model_lora *lr, int l, int lin, const float *const *A,
                    const float *const *Bm, const float *x, float *y, int ldy, int n)
{
    const kiln_config *c = lr->cfg;
    int r = lr->rank;
    for (int s = 0; s < kiln_lora_num_slots(c->arch); s++) {
        model_lora_slot sl = model_lora_slot_of(c, s);
        if (sl.lin != lin || !A[s]) continue;
        const float *xd = dropped(lr, l, s, x, lr->xs, (size_t)n * sl.in);
        float *h = lr->hs;
        xa(h, xd, A[s], n, sl.in, r);
        float sc = lr->scale;
        const float *bt = transposed(lr->bt, Bm[s], sl.out, r);
#pragma omp parallel for schedule(static) if ((long)n * sl.out * r > 65536)
        for (int i = 0; i < n; i++) {
            float *yi = y + (size_t)i * ldy + sl.off;
            const float *hi = h + (size_t)i * r;
            for (int k = 0; k < r; k++) {
                const float *bk = bt + (size_t)k * sl.out;
                float ck = sc * hi[k];
#pragma omp simd
                for (int o = 0; o < sl.out; o++) yi[o] += ck * bk[o];
            }
        }
    }
}

void model_lora_fwd_rows(const model_lora *lr, int lin, const float *const *A,
                         const float *const *Bm, const float *x, int ldx, float *y, int ldy,
                         const int *rows, int n)
{
    const kiln_config *c = lr->cfg;
    int r = lr->rank;
    for (int s = 0; s < kiln_lora_num_slots(c->arch); s++) {
        model_lora_slot sl = model_lora_slot_of(c, s);
        if (sl.lin != lin || !A[s]) continue;
        float *xg = lr->xs; /* the group's rows gathered (n, in) */
        for (int i = 0; i < n; i++)
            memcpy(xg + (size_t)i * sl.in, x + (size_t)rows[i] * ldx, (size_t)sl.in * 4);
        float *h = lr->hs;
        xa(h, xg, A[s], n, sl.in, r);
        float sc = lr->scale;
        const float *bt = transposed(lr->bt, Bm[s], sl.out, r);
        for (int i = 0; i < n; i++) {
            float *yi = y + (size_t)rows[i] * ldy + sl.off;
            const float *hi = h + (size_t)i * r;
            for (int k = 0; k < r; k++) {
                const float *bk = bt + (size_t)k * sl.out;
                float ck = sc * hi[k];
#pragma omp simd
                for (int o = 0; o < sl.out; o++) yi[o] += ck * bk[o];
            }
        }
    }
}

void model_lora_bwd(const model_lora *lr, int l, int lin, const float *const *A,
                    const float *const *Bm, float *const *dA, float *const *dB, const float *x,
                    const float *dy, int ldy, float *dx, int n)
{
    const kiln_config *c = lr->cfg;
    int r = lr->rank;
    float sc = lr->scale;
    for (int s = 0; s < kiln_lora_num_slots(c->arch); s++) {
        model_lora_slot sl = model_lora_slot_of(c, s);
        if (sl.lin != lin || !A[s]) continue;
        int in = sl.in, out = sl.out;
        const float *xd = dropped(lr, l, s, x, lr->xs, (size_t)n * in);
        float *h = lr->hs, *dh = lr->hs + (size_t)n * r;
        const float *B = Bm[s], *a = A[s];
        xa(h, xd, a, n, in, r);
        /* dh (n, r) = scale dy_slot B, with B' rows contiguous */
        const float *bt = transposed(lr->bt, B, out, r);
#pragma omp parallel for schedule(static) if ((long)n * out * r > 65536)
        for (int i = 0; i < n; i++) {
            const float *gi = dy + (size_t)i * ldy + sl.off;
            for (int k = 0; k < r; k++) {
                const float *bk = bt + (size_t)k * out;
                float acc = 0;
#pragma omp simd reduction(+ : acc)
                for (int o = 0; o < out; o++) acc += gi[o] * bk[o];
                dh[(size_t)i * r + k] = sc * acc;
            }
        }
        if (dB[s]) { /* dB (out, r) += scale dy_slot' h, summed as dB' (r, out) */
            float *gt = lr->bt + (size_t)r * out, *gb = dB[s];
#pragma omp parallel for schedule(static) if ((long)n * out * r > 65536)
            for (int k = 0; k < r; k++) {
                float *gk = gt + (size_t)k * out;
                for (int o = 0; o < out; o++) gk[o] = 0;
                for (int i = 0; i < n; i++) {
                    float ck = sc * h[(size_t)i * r + k];
                    const float *gi = dy + (size_t)i * ldy + sl.off;
#pragma omp simd
                    for (int o = 0; o < out; o++) gk[o] += ck * gi[o];
                }
            }
            for (int o = 0; o < out; o++)
                for (int k = 0; k < r; k++) gb[(size_t)o * r + k] += gt[(size_t)k * out + o];
        }
        if (dA[s]) { /* dA (r, in) += dh' xd */
            float *ga = dA[s];
#pragma omp parallel for schedule(static) if ((long)n * in * r > 65536)
            for (int k = 0; k < r; k++) {
                float *gk = ga + (size_t)k * in;
                for (int i = 0; i < n; i++) {
                    float d = dh[(size_t)i * r + k];
                    const float *xi = xd + (size_t)i * in;
#pragma omp simd
                    for (int j = 0; j < in; j++) gk[j] += d * xi[j];
                }
            }
        }
        if (dx) { /* dx += dropout'(dh A) */
            uint64_t key = lr->p > 0 ? slot_key(lr, l, s) : 0;
#pragma omp parallel for schedule(static) if ((long)n * in * r > 65536)
            for (int i = 0; i < n; i++) {
                float *t = lr->xs + (size_t)i * in; /* xd is no longer needed */
                for (int j = 0; j < in; j++) t[j] = 0;
                for (int k = 0; k < r; k++) {
                    float d = dh[(size_t)i * r + k];
                    const float *ak = a + (size_t)k * in;
#pragma omp simd
                    for (int j = 0; j < in; j++) t[j] += d * ak[j];
                }
                float *di = dx + (size_t)i * in;
                if (lr->p > 0)
                    for (int j = 0; j < in; j++) di[j] += t[j] * keep(lr, key, (size_t)i * in + j);
                else
                    for (int j = 0; j < in; j++) di[j] += t[j];
            }
        }
    }
}

/* ---- the model object's side --------------------------------------------- */

void kiln_model_lora_train(kiln_model *m, bool on, uint64_t seed)
{
    m->lora_train = on;
    m->lora_seed = seed;
    m->lora_step = 0;
}

static kiln_status check_opts(kiln_ctx *ctx, const kiln_config *c, const kiln_lora_opts *o)
{
    if (o->rank < 1 || o->rank > 4096)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_lora_opts.rank = %d is outside [1, 4096]", o->rank);
    if (!(o->alpha > 0) || !isfinite(o->alpha))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_lora_opts.alpha = %g must be a positive number", o->alpha);
    if (!(o->dropout >= 0 && o->dropout < 1))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_lora_opts.dropout = %g is outside [0, 1)", o->dropout);
    unsigned all = (1u << kiln_lora_num_slots(c->arch)) - 1;
    if (!o->targets || (o->targets & ~all))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_lora_opts.targets = 0x%x names no slot of the model (use "
                         "kiln_lora_parse_targets)", o->targets);
    if (c->lora_rank > 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "the model has LoRA adapters already (merge them first)");
    return KILN_OK;
}

/* A new model of cfg whose tensors named as m's get m's values. */
static kiln_status rebuild(kiln_ctx *ctx, const kiln_model *m, const kiln_config *cfg,
                           kiln_model **out)
{
    kiln_status s = kiln_model_new(ctx, cfg, out);
    if (s) return s;
    kiln_model *n = *out;
    int j = 0;
    for (int i = 0; i < n->n_tensors; i++) {
        const kiln_tensor_info *t = &n->tensors[i];
        /* both lists are in layout order: m's tensors are a subsequence
         * of n's (or the reverse), so one walk pairs them */
        int k = j;
        while (k < m->n_tensors && strcmp(m->tensors[k].name, t->name)) k++;
        if (k == m->n_tensors) continue;
        memcpy(n->params + t->offset, m->params + m->tensors[k].offset, t->numel * sizeof(float));
        j = k + 1;
    }
    n->threads = m->threads;
    return KILN_OK;
}

/* Freezes every base tensor of n (the adapters stay trainable). */
static kiln_status freeze_base(kiln_ctx *ctx, kiln_model *n)
{
    kiln_status s = kiln_model_set_trainable(ctx, n, "*", false, NULL);
    if (!s) s = kiln_model_set_trainable(ctx, n, "*.lora_[AB].weight", true, NULL);
    return s;
}

kiln_status model_lora_finish(kiln_ctx *ctx, kiln_model *m)
{
    return m->cfg.lora_rank > 0 ? freeze_base(ctx, m) : KILN_OK;
}

kiln_status kiln_model_add_lora(kiln_ctx *ctx, kiln_model **mp, const kiln_lora_opts *o)
{
    kiln_model *m = *mp;
    kiln_status s = check_opts(ctx, &m->cfg, o);
    if (s) return s;
    kiln_config cfg = m->cfg;
    cfg.lora_rank = o->rank;
    cfg.lora_alpha = o->alpha;
    cfg.lora_dropout = o->dropout;
    cfg.lora_targets = o->targets;
    kiln_model *n;
    if ((s = rebuild(ctx, m, &cfg, &n))) return s;
    kiln_rng rng;
    kiln_rng_seed(&rng, o->seed);
    for (int l = 0; l < n->L; l++)
        for (int k = 0; k < kiln_lora_num_slots(cfg.arch); k++) {
            if (!n->w.layers[l].lora_a[k]) continue;
            model_lora_slot sl = model_lora_slot_of(&cfg, k);
            /* kaiming_uniform_(a = sqrt(5)) on (r, in): gain sqrt(2 / 6),
             * bound gain * sqrt(3 / in) = 1 / sqrt(in) */
            double bound = 1.0 / sqrt((double)sl.in);
            float *A = n->w.layers[l].lora_a[k];
            for (size_t i = 0; i < (size_t)o->rank * sl.in; i++)
                A[i] = (float)((2.0 * kiln_rng_uniform(&rng) - 1.0) * bound);
            memset(n->w.layers[l].lora_b[k], 0, (size_t)sl.out * o->rank * sizeof(float));
        }
    kiln_model_free(m);
    *mp = n;
    return KILN_OK;
}

kiln_status kiln_model_merge_lora(kiln_ctx *ctx, kiln_model **mp)
{
    kiln_model *m = *mp;
    if (m->cfg.lora_rank <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "the model has no LoRA adapters to merge");
    kiln_config cfg = m->cfg;
    cfg.lora_rank = 0;
    cfg.lora_alpha = cfg.lora_dropout = 0;
    cfg.lora_targets = 0;
    kiln_model *n;
    kiln_status s = rebuild(ctx, m, &cfg, &n);
    if (s) return s;
    int r = m->cfg.lora_rank;
    double sc = (double)m->cfg.lora_alpha / r;
    bool gpt2 = cfg.arch == KILN_ARCH_GPT2;
    for (int l = 0; l < m->L; l++) {
        const model_layer *a = &m->w.layers[l];
        model_layer *w = &n->w.layers[l];
        float *mats[4] = {w->qkv_w, w->proj_w, w->fc_w, w->fcproj_w};
        for (int k = 0; k < kiln_lora_num_slots(cfg.arch); k++) {
            if (!a->lora_a[k]) continue;
            model_lora_slot sl = model_lora_slot_of(&m->cfg, k);
            int ldw = 0; /* gpt2 Conv1D is (in, out_total): fan_in_fan_out */
            if (gpt2) ldw = sl.lin == 0 ? 3 * m->C : sl.lin == 2 ? m->F : m->C;
            float *W = mats[sl.lin];
            const float *A = a->lora_a[k], *B = a->lora_b[k];
            for (int o = 0; o < sl.out; o++)
                for (int j = 0; j < sl.in; j++) {
                    double d = 0;
                    for (int q = 0; q < r; q++)
                        d += (double)B[(size_t)o * r + q] * A[(size_t)q * sl.in + j];
                    size_t e = gpt2 ? (size_t)j * ldw + sl.off + o
                                    : (size_t)(sl.off + o) * sl.in + j;
                    W[e] = (float)(W[e] + sc * d);
                }
        }
    }
    kiln_model_free(m);
    *mp = n;
    return KILN_OK;
}
