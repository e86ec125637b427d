/*
 * matrices.c — the model's weight matrices as a list, for the two things
 * that treat them apart from the other parameters: the optimizer's strip
 * refresh of a bf16 backend's prepared copies (model_wstrips,
 * model_wstrip_fresh; the step is kiln_model_adamw_step in
 * train/model_step.c, which owns the optimizer state), and the lazily
 * zeroed weight-matrix gradients of the one pass (pass.c).
 *
 * The bf16 products read each weight in the backend's prepared copies
 * (the cpu backend: packed two ways, the forward layout and the transposed
 * one of the input gradient). Refreshed at the next forward, that is one
 * more read of every fp32 weight per layout, the transposed one strided,
 * after the optimizer has just written them all. Here AdamW updates each
 * matrix in strips of the rows the backend asks for (weight_refresh_rows),
 * and each strip, still in cache, goes to the backend's weight_refresh
 * (the bytes its whole conversion writes); the weights are then marked
 * fresh for the next forward (weight_fresh). Any other write to the
 * parameters (kiln_model_params, load, init) starts a new weight epoch
 * first (model.c), so a mark never outlives its values.
 */
#include "model/model.h"

#include <stdlib.h>
#include <string.h>

/* A weight matrix as model_pass_forward prepares it on the backend (w, OC,
 * C, in_out), and where it lies in the parameter block. */
typedef struct wmat {
    const float *w;
    int oc, c;
    bool io;
    size_t off, len;
} wmat;

/* A prepared weight and its backend: the ud of a strip callback. */
typedef struct wref {
    kern_backend *be;
    kern_weight *w;
} wref;

struct model_upd {
    int n;
    wmat *wm;           /* sorted by offset (made once) */
    model_wstrip *ws;   /* this step's, in the same order */
    wref *pw;           /* the backend's handles of this step's matrices */
};

void model_upd_free(kiln_model *m)
{
    struct model_upd *u = m->upd;
    if (!u) return;
    free(u->wm);
    free(u->ws);
    free(u->pw);
    free(u);
    m->upd = NULL;
}

/* ud: a wref (the refresh reads the weight the handle was prepared from,
 * which is W). */
static void after_strip(void *ud, const float *W, int r0)
{
    const wref *r = ud;
    (void)W;
    r->be->weight_refresh(r->be, r->w, r0);
}

static int by_offset(const void *a, const void *b)
{
    const wmat *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

static void add(kiln_model *m, wmat *wm, int *n, const float *w, int oc, int c, bool io)
{
    if (wm) wm[*n] = (wmat){w, oc, c, io, (size_t)(w - m->params), (size_t)oc * (size_t)c};
    ++*n;
}

/* The weight matrices into wm (NULL: only counted); returns how many. */
static int list(kiln_model *m, wmat *wm)
{
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2;
    int FH = gpt2 ? m->F : 2 * m->F, n = 0;
    for (int l = 0; l < m->L; l++) {
        const model_layer *y = &m->w.layers[l];
        add(m, wm, &n, y->qkv_w, m->QKV, m->C, gpt2);
        add(m, wm, &n, y->proj_w, m->C, m->C, gpt2);
        add(m, wm, &n, y->fc_w, FH, m->C, gpt2);
        add(m, wm, &n, y->fcproj_w, m->C, m->F, gpt2);
    }
    add(m, wm, &n, m->w.lm_head, m->V, m->C, false);
    return n;
}

static struct model_upd *upd_of(kiln_model *m)
{
    if (m->upd) return m->upd;
    struct model_upd *u = calloc(1, sizeof *u);
    if (!u) return NULL;
    int n = list(m, NULL);
    u->n = n;
    u->wm = calloc((size_t)n, sizeof *u->wm);
    u->ws = calloc((size_t)n, sizeof *u->ws);
    u->pw = calloc((size_t)n, sizeof *u->pw);
    m->upd = u;
    if (!u->wm || !u->ws || !u->pw) {
        model_upd_free(m);
        return NULL;
    }
    list(m, u->wm);
    qsort(u->wm, (size_t)n, sizeof *u->wm, by_offset);
    return u;
}

int model_wstrips(kiln_model *m, const model_wstrip **out)
{
    *out = NULL;
    /* a caller holding kiln_model_params_mut may write at any time: no
     * copy is marked fresh then (every forward repacks) */
    if (kiln_model_precision(m) != KILN_PRECISION_BF16 || !m->be || m->params_shared) return 0;
    struct model_upd *u = upd_of(m);
    if (!u) return 0;
    kern_backend *be = m->be;
    int nm = 0;
    for (int i = 0; i < u->n; i++) {
        const wmat *x = &u->wm[i];
        if (m->any_frozen && model_range_frozen(m, x->off, x->len)) continue; /* not stepped */
        kern_weight *h = be->weight_prepare(be, x->w, x->oc, x->c,
                                            x->io ? KERN_W_IN_OUT : KERN_W_OUT_IN);
        if (!h) return 0; /* out of memory: the plain step; the forward repacks */
        int strip = be->weight_refresh_rows(be, h);
        if (!strip) continue;
        u->pw[nm] = (wref){be, h};
        u->ws[nm] = (model_wstrip){
            .offset = x->off,
            .rows = x->io ? x->c : x->oc,
            .cols = x->io ? x->oc : x->c,
            .strip = strip,
            .after = after_strip,
            .ud = &u->pw[nm],
        };
        nm++;
    }
    *out = u->ws;
    return nm;
}

void model_wkeep_frozen(kiln_model *m, bool (*untouched)(void *, size_t, size_t), void *ud)
{
    struct model_upd *u = m->upd;
    if (!m->any_frozen || !u || m->params_shared || !m->gemm->invalidate || !m->be ||
        kiln_model_precision(m) == KILN_PRECISION_FP32)
        return;
    for (int i = 0; i < u->n; i++)
        if (model_range_frozen(m, u->wm[i].off, u->wm[i].len) &&
            untouched(ud, u->wm[i].off, u->wm[i].len))
        {
            kern_weight *h = m->be->weight_prepare(m->be, u->wm[i].w, u->wm[i].oc, u->wm[i].c,
                                                   u->wm[i].io ? KERN_W_IN_OUT : KERN_W_OUT_IN);
            if (h) m->be->weight_keep(m->be, h);
        }
}

void model_wstrip_fresh(kiln_model *m, int i)
{
    struct model_upd *u = m->upd;
    KILN_ASSERT(u && i >= 0 && i < u->n);
    u->pw[i].be->weight_fresh(u->pw[i].be, u->pw[i].w);
}

/* ---- lazily zeroed weight-matrix gradients ------------------------------
 * The backward writes each weight matrix's gradient with one product
 * (model_pass_backward). Zeroing those ~85% of the gradient block before it
 * was a memset of them plus a read of the zeros by the first K chunk of
 * each product; now kiln_model_zero_grad zeroes the rest and marks the
 * matrices lazy, the next backward stores their products instead of
 * adding them (the backend's dw_acc false; the f32 backend zeroes each
 * matrix just before its product), and anything else that would see the
 * zeros first (kiln_model_grads, the trainer's reads) writes them out. */

void model_grads_zero(kiln_model *m)
{
    struct model_upd *u = upd_of(m);
    if (!u) {
        if (m->any_frozen) { /* frozen ranges are zeros already */
            for (int i = 0; i < m->n_tensors; i++)
                if (m->tensors[i].trainable)
                    memset(m->grads + m->tensors[i].offset, 0, m->tensors[i].numel * sizeof(float));
        } else {
            memset(m->grads, 0, m->num_params * sizeof(float));
        }
        m->grads_lazy = false;
        return;
    }
    size_t pos = 0;
    for (int i = 0; i < u->n; i++) {
        /* a frozen matrix too: no backward writes it, and its gradient is
         * zeros already (kiln_model_set_trainable), lazy or not */
        memset(m->grads + pos, 0, (u->wm[i].off - pos) * sizeof(float));
        pos = u->wm[i].off + u->wm[i].len;
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
        memset(m->grads + u->wm[i].off, 0, u->wm[i].len * sizeof(float));
    m->grads_lazy = false;
}
