/*
 * update_mp.c — the optimizer step of a bf16 model that also writes the
 * packed bf16 copies of its weight matrices (kiln_model_adamw_step).
 *
 * The bf16 products read each weight twice per step, packed two ways
 * (bf16_ops.c: the forward layout and the transposed one of the input
 * gradient). Refreshed at the next forward, that is one more read of
 * every fp32 weight per layout, the transposed one strided, after the
 * optimizer has just written them all. Here AdamW updates each matrix in
 * strips of 32 rows, and each strip, still in cache, is packed into both
 * copies (mp_weight_refresh_strip, the bytes mp_weight_refresh writes);
 * the cache entries are then marked fresh for the next forward. Any other
 * write to the parameters (kiln_model_params, load, init) invalidates the
 * cache first (model.c), so a mark never outlives its values.
 */
#include "kernels/x86/bf16_ops.h"
#include "model/model.h"
#include "train/adamw.h"

#include <stdlib.h>
#include <string.h>

typedef struct span {
    size_t off, len;
} span;

struct model_upd {
    int n;
    span *spans;        /* the matrices' ranges in the parameter block, sorted */
    adamw_matrix *mats; /* sorted by offset */
    mp_weight *pw;      /* copies of the cache entries' descriptors */
    const float **w;    /* the weights, as the cache keys them */
    int *oc, *c;
    bool *io;
};

void model_upd_free(kiln_model *m)
{
    struct model_upd *u = m->upd;
    if (!u) return;
    free(u->mats);
    free(u->spans);
    free(u->pw);
    free(u->w);
    free(u->oc);
    free(u->c);
    free(u->io);
    free(u);
    m->upd = NULL;
}

static void after_strip(void *ud, const float *W, int r0)
{
    mp_weight_refresh_strip(ud, W, r0);
}

static int by_span(const void *a, const void *b)
{
    const span *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

static int by_offset(const void *a, const void *b)
{
    const adamw_matrix *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* The weight matrices as model_mp_forward / the linear ops look them up:
 * (w, OC, C, in_out). */
static int list(kiln_model *m, const float **w, int *oc, int *c, bool *io)
{
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2;
    int FH = gpt2 ? m->F : 2 * m->F, n = 0;
    for (int l = 0; l < m->L; l++) {
        const model_layer *y = &m->w.layers[l];
        const float *ws[4] = {y->qkv_w, y->proj_w, y->fc_w, y->fcproj_w};
        int ocs[4] = {m->QKV, m->C, FH, m->C}, cs[4] = {m->C, m->C, m->C, m->F};
        for (int i = 0; i < 4; i++, n++)
            if (w) w[n] = ws[i], oc[n] = ocs[i], c[n] = cs[i], io[n] = gpt2;
    }
    if (w) w[n] = m->w.lm_head, oc[n] = m->V, c[n] = m->C, io[n] = false;
    return n + 1;
}

static struct model_upd *upd_of(kiln_model *m)
{
    if (m->upd) return m->upd;
    struct model_upd *u = calloc(1, sizeof *u);
    int n = list(m, NULL, NULL, NULL, NULL);
    if (!u) return NULL;
    u->n = n;
    u->mats = calloc((size_t)n, sizeof *u->mats);
    u->spans = calloc((size_t)n, sizeof *u->spans);
    u->pw = calloc((size_t)n, sizeof *u->pw);
    u->w = calloc((size_t)n, sizeof *u->w);
    u->oc = calloc((size_t)n, sizeof *u->oc);
    u->c = calloc((size_t)n, sizeof *u->c);
    u->io = calloc((size_t)n, sizeof *u->io);
    m->upd = u;
    if (!u->mats || !u->spans || !u->pw || !u->w || !u->oc || !u->c || !u->io) {
        model_upd_free(m);
        return NULL;
    }
    list(m, u->w, u->oc, u->c, u->io);
    for (int i = 0; i < n; i++)
        u->spans[i] = (span){(size_t)(u->w[i] - m->params), (size_t)u->oc[i] * (size_t)u->c[i]};
    qsort(u->spans, (size_t)n, sizeof *u->spans, by_span);
    return u;
}

void kiln_model_adamw_step(kiln_model *m, kiln_adamw *o, const float *grads, float lr,
                           float grad_mul)
{
    struct model_upd *u = NULL;
    if (kiln_model_precision(m) == KILN_PRECISION_BF16 && kiln_adamw_size(o) == m->num_params)
        u = upd_of(m);
    int nm = 0;
    if (u) {
        kern_gemm *g = m->gemm;
        /* entries first (creating one may move the others), then copies */
        bool ok = true;
        for (int i = 0; i < u->n && ok; i++)
            ok = mp_kern_weight_entry(g, u->w[i], u->oc[i], u->c[i], u->io[i]) != NULL;
        for (int i = 0; i < u->n && ok; i++) {
            mp_weight *e = mp_kern_weight_entry(g, u->w[i], u->oc[i], u->c[i], u->io[i]);
            int strip = mp_weight_strip_rows(e);
            if (!strip) continue;
            u->pw[nm] = *e;
            u->mats[nm] = (adamw_matrix){
                .offset = (size_t)(u->w[i] - m->params),
                .rows = u->io[i] ? u->c[i] : u->oc[i],
                .cols = u->io[i] ? u->oc[i] : u->c[i],
                .strip = strip,
                .after = after_strip,
                .ud = &u->pw[nm],
            };
            nm++;
        }
        if (!ok) nm = 0; /* out of memory: the plain step; the forward repacks */
        /* the ud pointers stay valid: sorting moves the adamw_matrix only */
        qsort(u->mats, (size_t)nm, sizeof *u->mats, by_offset);
    }
    adamw_step_matrices(o, m->params, grads, lr, grad_mul, nm ? u->mats : NULL, nm);
    for (int i = 0; i < nm; i++) {
        const mp_weight *pw = u->mats[i].ud;
        if (u->mats[i].done)
            mp_kern_weight_fresh(m->gemm, m->params + u->mats[i].offset, pw->OC, pw->C,
                                 pw->in_out);
    }
}

/* ---- lazily zeroed weight-matrix gradients ------------------------------
 * The bf16 backward writes each weight matrix's gradient with one product
 * (model_mp_backward). Zeroing those ~85% of the gradient block before it
 * was a memset of them plus a read of the zeros by the first K chunk of
 * each product; now kiln_model_zero_grad zeroes the rest and marks the
 * matrices lazy, the next bf16 backward stores their products instead of
 * adding them, and anything else that would see the zeros first
 * (kiln_model_grads, the fp32-activation backward) writes them out. */

void model_mp_zero_grad(kiln_model *m)
{
    struct model_upd *u = m->act_mp ? upd_of(m) : NULL;
    if (!u) {
        memset(m->grads, 0, m->num_params * sizeof(float));
        m->grads_lazy = false;
        return;
    }
    size_t pos = 0;
    for (int i = 0; i < u->n; i++) {
        memset(m->grads + pos, 0, (u->spans[i].off - pos) * sizeof(float));
        pos = u->spans[i].off + u->spans[i].len;
    }
    memset(m->grads + pos, 0, (m->num_params - pos) * sizeof(float));
    m->grads_lazy = true;
}

void model_grads_materialize(kiln_model *m)
{
    if (!m->grads_lazy) return;
    struct model_upd *u = m->upd;
    KILN_ASSERT(u); /* grads_lazy is only set with the list at hand */
    for (int i = 0; i < u->n; i++)
        memset(m->grads + u->spans[i].off, 0, u->spans[i].len * sizeof(float));
    m->grads_lazy = false;
}
