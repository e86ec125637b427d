/*
 * engine.c — the inference engine: prepared weights, a KV cache per slot
 * and one forward step that serves prefill, batched decode and both mixed.
 *
 * A step takes T entries (slot, token). Each entry is appended to its
 * slot's cache at that slot's next position, so a prefill chunk is T
 * entries of one slot, a decode step is one entry per active slot, and the
 * scheduler may mix them. Each layer is the model's own block
 * (model/block.c: the same ops as the training forward), run over the T
 * entries with the engine's attention: K and V of all entries are written
 * to the cache, then entry t attends to its slot's positions <= its own,
 * which is causal masking for a prefill chunk and independence for
 * sequences in different slots. A chunk that is the start of one fresh
 * sequence (one slot, positions 0..T-1) takes the training forward's own
 * rope and flash attention instead, so an fp32 prefill computes the
 * training forward's logits bit for bit (test_engine_equals_forward).
 *
 * The weights are the model's tensors prepared once for the backend's
 * typed linear (kern_weight_prepare): fp32 copies in the model's layout,
 * or bf16 rows (out, in) for decode to stream at half the bytes. Each
 * matrix is read once per step for all T entries, which is what makes a
 * batch of sequences cost about the same memory traffic as one.
 */
#include "infer/infer.h"
#include "kernels/kernels.h"
#include "model/model.h"

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

struct kiln_engine {
    kiln_config cfg;
    kiln_engine_opts opts;
    model_shape sh;
    int C, HS, KVD, F, V, L, NH, KVH, S, NCTX, QKV;
    const kern_ops *k;
    kern_gemm *gemm;   /* the library's fastest GEMM (oneDNN when built) */
    float *vecs;       /* fp32 copies: wte, wpe, norms, biases */
    const float *wte;  /* (V, C) token lookup */
    const float *wpe;  /* (NCTX, C) gpt2 */
    const float *lnf_w, *lnf_b;
    model_blk_src *lw; /* (L) the layers' prepared weights */
    model_blk_w *lh;   /* (L) the same as handles of be (kern_f32_weight) */
    kern_backend *be;  /* the f32 backend over k and gemm, streaming */
    kern_wt head;      /* (V, C) */
    bool head_owned;
    float *rope_cos, *rope_sin; /* (NCTX, HS/2) llama: the model's table */
    float *kc, *vc;    /* (L, S, NCTX, KVD) */
    int *pos;          /* (S) */
    /* scratch for T = opts.chunk entries */
    float *x, *xn, *res2, *qkv, *att, *hid, *ff; /* (T,C)x3 (T,QKV) (T,C) (T,FH) (T,F) */
    float *mean, *rstd; /* (T) */
    float *lse;        /* (NH, T) */
    float *scores;     /* (T, NH, NCTX) */
    int *epos, *eslot; /* (T) */
    int *wrow;         /* (T) */
    int *slot_next;    /* (S) */
    int step_T;        /* the step being run (for the attention callback) */
    const kiln_engine_tok *step_toks;
    size_t weight_bytes;
    int n_fallback;    /* matrices stored in another type than opts.wtype */
    kiln_gguf *gguf;   /* opts.weights_gguf while building */
    model_gguf_tensor *gguf_list;
    int gguf_n, n_stored, n_converted; /* matrices taken as stored / prepared */
    int nth;           /* OpenMP threads */
    /* served LoRA adapters (ids 1..n_ad; ad[0] unused): each its A, B
     * and run state over shared scratch (lora_*: T rows, the largest
     * rank); the slots' adapter ids; a step's row groups */
    model_adapter *ad;
    model_lora *ad_run;
    int n_ad, ad_rank;
    int *slot_ad;      /* (S) */
    float *lora_xu, *lora_xs, *lora_hs, *lora_bt;
    model_lora_group *groups; /* (n_ad) */
    int *grow;         /* (n_ad, T) each group's rows */
    float *hid_out;    /* set by kiln_engine_embed: the step writes the wanted
                          rows' final-norm hidden states (nw, C) here
                          instead of their logits */
};

kiln_engine_opts kiln_engine_opts_default(void)
{
    return (kiln_engine_opts){.n_slots = 1, .n_ctx = 0, .chunk = 64,
                              .wtype = KILN_DTYPE_F32};
}

/* ---- building ------------------------------------------------------ */

void kiln_engine_free(kiln_engine *e)
{
    if (!e) return;
    if (e->lw)
        for (int l = 0; l < e->L; l++) {
            kern_weight_free(&e->lw[l].qkv);
            kern_weight_free(&e->lw[l].proj);
            kern_weight_free(&e->lw[l].fc);
            kern_weight_free(&e->lw[l].fcproj);
        }
    free(e->lw);
    free(e->lh);
    kern_backend_free(e->be);
    if (e->head_owned) kern_weight_free(&e->head);
    free(e->vecs);
    free(e->rope_cos); free(e->rope_sin);
    free(e->kc); free(e->vc); free(e->pos);
    free(e->x); free(e->xn); free(e->res2); free(e->qkv); free(e->att); free(e->hid);
    free(e->ff); free(e->mean); free(e->rstd); free(e->lse); free(e->scores);
    free(e->epos); free(e->eslot); free(e->wrow); free(e->slot_next);
    kern_gemm_free(e->gemm);
    for (int i = 1; i <= e->n_ad; i++) model_adapter_free(&e->ad[i]);
    free(e->ad); free(e->ad_run); free(e->slot_ad); free(e->groups); free(e->grow);
    free(e->lora_xu); free(e->lora_xs); free(e->lora_hs); free(e->lora_bt);
    free(e);
}

/* The fp32 vectors (and embedding tables) are copied into one block. */
typedef struct vcopy {
    float *base;
    size_t used;
} vcopy;

static const float *vput(vcopy *v, const float *p, size_t n)
{
    if (!p) return NULL;
    float *d = v->base + v->used;
    memcpy(d, p, n * sizeof(float));
    v->used += (n + 15) & ~(size_t)15; /* keep 64-byte alignment */
    return d;
}

static size_t vsize(size_t n) { return (n + 15) & ~(size_t)15; }

/* A matrix from the model's GGUF file in its stored type when the engine
 * has one (engine_gguf.c), else prepared from the fp32 model as wtype (or
 * the widest type of its stacked parts in the file). weight_bytes counts
 * what a decode step streams: the matrices and the head (the embedding
 * tables are looked up, a row per token). */
static kiln_status prep_any(kiln_ctx *ctx, kiln_engine *e, const kiln_model *m,
                            const kern_wt *src, kern_wt *out)
{
    kiln_dtype as = e->opts.wtype;
    if (e->gguf) {
        int r = engine_gguf_matrix(m, e->gguf, e->gguf_list, e->gguf_n, src, out, &as);
        if (r < 0) return kiln_fail(ctx, KILN_ERR_NOMEM, "engine: out of memory for the weights");
        if (r == 1) {
            e->weight_bytes += dtype_row_bytes(out->dtype, (int64_t)out->cols) * (size_t)out->rows;
            e->n_stored++;
            return KILN_OK;
        }
        e->n_converted++;
    }
    if (!kern_weight_prepare(as, src, out))
        return kiln_fail(ctx, KILN_ERR_NOMEM, "engine: out of memory for the weights");
    if (out->dtype != as) e->n_fallback++;
    e->weight_bytes += dtype_row_bytes(out->dtype, (int64_t)out->cols) * (size_t)out->rows;
    return KILN_OK;
}

static kiln_status build_weights(kiln_ctx *ctx, kiln_engine *e, const kiln_model *m)
{
    const int C = e->C, L = e->L;
    const bool gpt2 = e->cfg.arch == KILN_ARCH_GPT2;
    const model_weights *w = &m->w;
    /* the vectors: per layer ln1 w/b, ln2 w/b, 4 biases; wte, wpe, lnf */
    size_t nv = vsize((size_t)e->V * C) + (gpt2 ? vsize((size_t)e->NCTX * C) : 0) + 2 * vsize(C);
    for (int l = 0; l < L; l++) {
        model_blk_src b = model_blk_weights(m, l);
        nv += 4 * vsize(C) + vsize(b.qkv.rows) + vsize(b.proj.rows) + vsize(b.fc.rows) +
              vsize(b.fcproj.rows);
    }
    vcopy v = {kiln_aligned_alloc(ctx, nv * sizeof(float) + 64), 0};
    e->vecs = v.base;
    e->lw = kiln_calloc(ctx, (size_t)L, sizeof *e->lw);
    e->lh = kiln_calloc(ctx, (size_t)L, sizeof *e->lh);
    if (!v.base || !e->lw || !e->lh) return KILN_ERR_NOMEM;
    e->wte = vput(&v, w->wte, (size_t)e->V * C);
    e->wpe = gpt2 ? vput(&v, w->wpe, (size_t)e->NCTX * C) : NULL;
    e->lnf_w = vput(&v, w->lnf_w, C);
    e->lnf_b = vput(&v, w->lnf_b, C);
    for (int l = 0; l < L; l++) {
        model_blk_src b = model_blk_weights(m, l), *o = &e->lw[l];
        o->ln1_w = vput(&v, b.ln1_w, C);
        o->ln1_b = vput(&v, b.ln1_b, C);
        o->ln2_w = vput(&v, b.ln2_w, C);
        o->ln2_b = vput(&v, b.ln2_b, C);
        o->qkv_b = vput(&v, b.qkv_b, b.qkv.rows);
        o->proj_b = vput(&v, b.proj_b, b.proj.rows);
        o->fc_b = vput(&v, b.fc_b, b.fc.rows);
        o->fcproj_b = vput(&v, b.fcproj_b, b.fcproj.rows);
        kiln_status st;
        if ((st = prep_any(ctx, e, m, &b.qkv, &o->qkv)) ||
            (st = prep_any(ctx, e, m, &b.proj, &o->proj)) ||
            (st = prep_any(ctx, e, m, &b.fc, &o->fc)) ||
            (st = prep_any(ctx, e, m, &b.fcproj, &o->fcproj)))
            return st;
        e->lh[l] = (model_blk_w){.ln1_w = o->ln1_w, .ln1_b = o->ln1_b, .ln2_w = o->ln2_w,
                                 .ln2_b = o->ln2_b, .qkv = kern_f32_weight(&o->qkv),
                                 .proj = kern_f32_weight(&o->proj),
                                 .fc = kern_f32_weight(&o->fc),
                                 .fcproj = kern_f32_weight(&o->fcproj), .qkv_b = o->qkv_b,
                                 .proj_b = o->proj_b, .fc_b = o->fc_b, .fcproj_b = o->fcproj_b};
    }
    KILN_ASSERT(v.used <= nv);
    /* LM head: the embedding itself when tied and fp32 */
    kern_wt hw = {KILN_DTYPE_F32, KERN_W_OUT_IN, e->V, C, w->lm_head};
    if (w->lm_head == w->wte && e->opts.wtype == KILN_DTYPE_F32) {
        e->head = (kern_wt){KILN_DTYPE_F32, KERN_W_OUT_IN, e->V, C, e->wte};
        e->weight_bytes += (size_t)e->V * C * 4; /* streamed as the head */
        return KILN_OK;
    }
    e->head_owned = true;
    return prep_any(ctx, e, m, &hw, &e->head);
}

kiln_status kiln_engine_new(kiln_ctx *ctx, const kiln_model *m, const kiln_engine_opts *opts,
                            kiln_engine **out)
{
    *out = NULL;
    const kiln_config *cfg = &m->cfg;
    kiln_engine_opts o = opts ? *opts : kiln_engine_opts_default();
    if (cfg->lora_rank > 0) /* the engine streams the base weights only */
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "the model has LoRA adapters (a LoRA run's checkpoint or "
                         "kiln_model_load_adapter): merge them first (kiln_model_merge_lora), or build "
                         "the engine over the base and add them (kiln_engine_add_adapter)");
    if (o.n_slots < 1 || o.n_slots > 4096)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_engine_opts.n_slots = %d is outside 1..4096", o.n_slots);
    if (o.n_ctx <= 0 || o.n_ctx > cfg->n_ctx) {
        if (o.n_ctx > cfg->n_ctx)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_engine_opts.n_ctx = %d exceeds the model's n_ctx %d "
                             "(use kiln_engine_opts.n_ctx = %d or less)",
                             o.n_ctx, cfg->n_ctx, cfg->n_ctx);
        o.n_ctx = cfg->n_ctx;
    }
    if (o.chunk < 1) o.chunk = 64;
    if (o.chunk < o.n_slots) o.chunk = o.n_slots;
    if (o.wtype != KILN_DTYPE_F32 && o.wtype != KILN_DTYPE_BF16 &&
        o.wtype != KILN_DTYPE_Q8_0 && o.wtype != KILN_DTYPE_Q4_0 &&
        o.wtype != KILN_DTYPE_Q4_K && o.wtype != KILN_DTYPE_Q6_K)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_engine_opts.wtype = %d (%s): the engine stores weights as "
                         "KILN_DTYPE_F32, BF16, Q8_0, Q4_0, Q4_K or Q6_K",
                         (int)o.wtype, kiln_dtype_name(o.wtype));

    kiln_engine *e = kiln_calloc(ctx, 1, sizeof *e);
    if (!e) return KILN_ERR_NOMEM;
    e->cfg = *cfg;
    e->opts = o;
    e->nth = kiln_get_threads(ctx);
#ifdef _OPENMP
    if (e->nth <= 0) e->nth = omp_get_max_threads();
#else
    e->nth = 1;
#endif
    e->sh = model_shape_of(m);
    e->C = m->C;
    e->NH = m->NH;
    e->KVH = m->KVH;
    e->HS = m->HS;
    e->KVD = e->KVH * e->HS;
    e->QKV = m->QKV;
    e->F = m->F;
    e->V = m->V;
    e->L = m->L;
    e->S = o.n_slots;
    e->NCTX = o.n_ctx;
    e->k = kern_ops_fast();
    e->gemm = kern_gemm_fast_new();
    e->be = e->gemm ? kern_backend_f32_new(e->k, e->gemm, false, true) : NULL;
    const bool llama = cfg->arch == KILN_ARCH_LLAMA;
    kiln_status st = KILN_OK;
    if (o.weights_gguf) {
        st = kiln_gguf_open(ctx, o.weights_gguf, &e->gguf);
        if (!st) {
            e->gguf_n = model_gguf_tensors(m, NULL);
            e->gguf_list = kiln_calloc(ctx, (size_t)e->gguf_n + 1, sizeof *e->gguf_list);
            if (!e->gguf_list) st = KILN_ERR_NOMEM;
            else model_gguf_tensors(m, e->gguf_list);
        }
    }
    if (!st) st = e->be ? build_weights(ctx, e, m) : KILN_ERR_NOMEM;
    if (e->gguf) {
        kiln_log(ctx, KILN_LOG_INFO,
                 "engine: %d matrices taken from %s in their stored types, %d prepared from "
                 "its dequantized values (stacked parts of different types: the widest; F16: "
                 "as %s)",
                 e->n_stored, o.weights_gguf, e->n_converted,
                 o.wtype == KILN_DTYPE_F32 ? "fp32" : kiln_dtype_name(o.wtype));
        kiln_gguf_close(e->gguf);
        e->gguf = NULL;
        free(e->gguf_list);
        e->gguf_list = NULL;
    }
    if (st) { kiln_engine_free(e); return st; }
    if (e->n_fallback) {
        int blk = (int)dtype_traits_of(o.wtype)->block, wd = e->C % blk ? e->C : e->F;
        kiln_log(ctx, KILN_LOG_INFO,
                 "engine: %d of %d matrices stored as %s instead of %s: their rows of %d "
                 "inputs are not a multiple of its %d-element block",
                 e->n_fallback, 4 * e->L + 1, kiln_dtype_name(kern_weight_dtype(o.wtype, wd)),
                 kiln_dtype_name(o.wtype), wd, blk);
    }

    if (llama) { /* the model's own table, for the positions the engine uses */
        size_t n = (size_t)e->NCTX * (e->HS / 2);
        e->rope_cos = kiln_aligned_alloc(ctx, n * 4 + 64);
        e->rope_sin = kiln_aligned_alloc(ctx, n * 4 + 64);
        if (!e->rope_cos || !e->rope_sin) { kiln_engine_free(e); return KILN_ERR_NOMEM; }
        memcpy(e->rope_cos, m->rope_cos, n * 4);
        memcpy(e->rope_sin, m->rope_sin, n * 4);
    }

    size_t kvn = (size_t)e->L * e->S * e->NCTX * e->KVD;
    const int T = o.chunk, FH = llama ? 2 * e->F : e->F;
    e->kc = kiln_aligned_alloc(ctx, kvn * 4 + 64);
    e->vc = kiln_aligned_alloc(ctx, kvn * 4 + 64);
    e->pos = kiln_calloc(ctx, (size_t)e->S, sizeof(int));
    e->slot_next = kiln_calloc(ctx, (size_t)e->S, sizeof(int));
    e->x = kiln_aligned_alloc(ctx, (size_t)T * e->C * 4 + 64);
    e->xn = kiln_aligned_alloc(ctx, (size_t)T * e->C * 4 + 64);
    e->res2 = kiln_aligned_alloc(ctx, (size_t)T * e->C * 4 + 64);
    e->qkv = kiln_aligned_alloc(ctx, (size_t)T * e->QKV * 4 + 64);
    e->att = kiln_aligned_alloc(ctx, (size_t)T * e->C * 4 + 64);
    e->hid = kiln_aligned_alloc(ctx, (size_t)T * FH * 4 + 64);
    e->ff = kiln_aligned_alloc(ctx, (size_t)T * e->F * 4 + 64);
    e->mean = kiln_aligned_alloc(ctx, (size_t)T * 4 + 64);
    e->rstd = kiln_aligned_alloc(ctx, (size_t)T * 4 + 64);
    e->lse = kiln_aligned_alloc(ctx, (size_t)T * e->NH * 4 + 64);
    e->scores = kiln_aligned_alloc(ctx, (size_t)T * e->NH * e->NCTX * 4 + 64);
    e->epos = kiln_calloc(ctx, (size_t)T, sizeof(int));
    e->eslot = kiln_calloc(ctx, (size_t)T, sizeof(int));
    e->wrow = kiln_calloc(ctx, (size_t)T, sizeof(int));
    e->slot_ad = kiln_calloc(ctx, (size_t)e->S, sizeof(int));
    if (!e->slot_ad ||!e->kc || !e->vc || !e->pos || !e->slot_next || !e->x || !e->xn || !e->res2 ||
        !e->qkv || !e->att || !e->hid || !e->ff || !e->mean || !e->rstd || !e->lse ||
        !e->scores || !e->epos || !e->eslot || !e->wrow) {
        kiln_engine_free(e);
        return kiln_fail(ctx, KILN_ERR_NOMEM,
                         "engine: out of memory for the KV cache (%d slots x %d "
                         "positions); lower kiln_engine_opts.n_slots or kiln_engine_opts.n_ctx",
                         e->S, e->NCTX);
    }
    *out = e;
    return KILN_OK;
}

const kiln_config *kiln_engine_config(const kiln_engine *e) { return &e->cfg; }
int kiln_engine_n_slots(const kiln_engine *e) { return e->S; }
int kiln_engine_n_ctx(const kiln_engine *e) { return e->NCTX; }
int kiln_engine_chunk(const kiln_engine *e) { return e->opts.chunk; }
size_t kiln_engine_weight_bytes(const kiln_engine *e) { return e->weight_bytes; }

void kiln_engine_reset(kiln_engine *e, int slot)
{
    if (slot >= 0 && slot < e->S) e->pos[slot] = 0;
}

int kiln_engine_pos(const kiln_engine *e, int slot)
{
    return (slot >= 0 && slot < e->S) ? e->pos[slot] : -1;
}

/* ---- served adapters ------------------------------------------------ */

/* Grows the adapters' shared scratch for rank r (T rows). */
static kiln_status lora_scratch(kiln_ctx *ctx, kiln_engine *e, int r)
{
    if (r <= e->ad_rank && e->lora_xu) return KILN_OK;
    r = KILN_MAX(r, e->ad_rank);
    const int T = e->opts.chunk, FH = e->cfg.arch == KILN_ARCH_LLAMA ? 2 * e->F : e->F;
    size_t wide = (size_t)KILN_MAX(e->C, e->F), outs = (size_t)KILN_MAX(KILN_MAX(e->QKV, FH), e->C);
    free(e->lora_xu); free(e->lora_xs); free(e->lora_hs); free(e->lora_bt);
    e->lora_xu = kiln_aligned_alloc(ctx, (size_t)T * wide * 4 + 64);
    e->lora_xs = kiln_aligned_alloc(ctx, (size_t)T * wide * 4 + 64);
    e->lora_hs = kiln_aligned_alloc(ctx, (size_t)2 * T * r * 4 + 64);
    e->lora_bt = kiln_aligned_alloc(ctx, (size_t)2 * r * outs * 4 + 64);
    if (!e->lora_xu || !e->lora_xs || !e->lora_hs || !e->lora_bt) {
        e->ad_rank = 0;
        return kiln_fail(ctx, KILN_ERR_NOMEM, "engine: out of memory for the adapters' scratch");
    }
    e->ad_rank = r;
    return KILN_OK;
}

kiln_status kiln_engine_add_adapter(kiln_ctx *ctx, kiln_engine *e, const char *dir, int *id)
{
    *id = 0;
    if (e->n_ad >= 1024)
        return kiln_fail(ctx, KILN_ERR_RANGE, "engine: 1024 adapters at most");
    model_adapter ad;
    kiln_status st = model_adapter_read(ctx, &e->cfg, dir, &ad);
    if (st) return st;
    int n = e->n_ad + 1;
    model_adapter *na = realloc(e->ad, (size_t)(n + 1) * sizeof *na);
    if (na) e->ad = na;
    model_lora *nr = na ? realloc(e->ad_run, (size_t)(n + 1) * sizeof *nr) : NULL;
    if (nr) e->ad_run = nr;
    model_lora_group *ng = nr ? realloc(e->groups, (size_t)n * sizeof *ng) : NULL;
    if (ng) e->groups = ng;
    int *gr = ng ? realloc(e->grow, (size_t)n * e->opts.chunk * sizeof *gr) : NULL;
    if (gr) e->grow = gr;
    if (!gr) {
        model_adapter_free(&ad);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "engine: out of memory for adapter %s", dir);
    }
    e->ad[n] = ad;
    e->n_ad = n;
    /* the adapter's own config from here on (e->ad may not move again
     * before the next add, which re-points every run below) */
    for (int i = 1; i <= n; i++) {
        const kiln_config *c = &e->ad[i].cfg;
        e->ad_run[i] = (model_lora){.cfg = c, .rank = c->lora_rank,
                                    .scale = c->lora_alpha / (float)c->lora_rank};
    }
    if ((st = lora_scratch(ctx, e, ad.cfg.lora_rank))) {
        model_adapter_free(&e->ad[n]);
        e->n_ad = n - 1;
        return st;
    }
    for (int i = 1; i <= n; i++) { /* every adapter runs on the shared scratch */
        e->ad_run[i].xu = e->lora_xu;
        e->ad_run[i].xs = e->lora_xs;
        e->ad_run[i].hs = e->lora_hs;
        e->ad_run[i].bt = e->lora_bt;
    }
    *id = n;
    return KILN_OK;
}

kiln_status kiln_engine_set_slot_adapter(kiln_ctx *ctx, kiln_engine *e, int slot, int id)
{
    if (slot < 0 || slot >= e->S)
        return kiln_fail(ctx, KILN_ERR_RANGE, "engine: slot %d out of range", slot);
    if (id < 0 || id > e->n_ad)
        return kiln_fail(ctx, KILN_ERR_RANGE, "engine: adapter %d out of range (0..%d)", id,
                         e->n_ad);
    e->slot_ad[slot] = id;
    return KILN_OK;
}

int kiln_engine_slot_adapter(const kiln_engine *e, int slot)
{
    return (slot >= 0 && slot < e->S) ? e->slot_ad[slot] : -1;
}

int kiln_engine_n_adapters(const kiln_engine *e) { return e->n_ad; }

size_t kiln_engine_adapter_bytes(const kiln_engine *e, int id)
{
    return (id >= 1 && id <= e->n_ad) ? e->ad[id].n_floats * sizeof(float) : 0;
}

/* The step's rows of each adapter that has any (r->groups). */
static void group_rows(kiln_engine *e, model_run *r, int T)
{
    int ng = 0;
    for (int a = 1; a <= e->n_ad; a++) {
        int *rows = e->grow + (size_t)(a - 1) * e->opts.chunk, n = 0;
        for (int t = 0; t < T; t++)
            if (e->slot_ad[e->eslot[t]] == a) rows[n++] = t;
        if (n) e->groups[ng++] = (model_lora_group){&e->ad_run[a], &e->ad[a], rows, n};
    }
    r->groups = e->groups;
    r->n_groups = ng;
    r->xu = e->lora_xu;
}

/* ---- forward ------------------------------------------------------- */

/* The engine's attention of layer l for the step's T entries: rope at each
 * entry's position, K and V into the cache, then each query against its
 * slot's cache. A fresh sequence's first chunk runs the training
 * forward's rope and flash attention over the chunk (the same result up
 * to rounding, and the same bits as training). */
static void attend(void *ud, int l, const model_blk *io)
{
    kiln_engine *e = ud;
    float *qkv = io->qkv, *atty = (float *)io->attyp; /* the f32 backend's acts */
    const int T = e->step_T, HS = e->HS, KVD = e->KVD, QKV = e->QKV;
    const bool llama = e->cfg.arch == KILN_ARCH_LLAMA;
    bool fresh = true;
    for (int t = 0; t < T && fresh; t++)
        fresh = e->eslot[t] == e->eslot[0] && e->epos[t] == t;
    if (llama) {
        if (fresh)
            e->k->rope(qkv, e->rope_cos, e->rope_sin, 1, T, e->NH, e->KVH, HS, false);
        else
            e->k->rope_at(qkv, T, (size_t)QKV, e->epos, e->rope_cos, e->rope_sin,
                          e->NH + e->KVH, HS);
    }
    const size_t slot_stride = (size_t)e->NCTX * KVD;
    float *kc = e->kc + (size_t)l * e->S * slot_stride, *vc = e->vc + (size_t)l * e->S * slot_stride;
    for (int t = 0; t < T; t++) {
        const float *k = qkv + (size_t)t * QKV + (size_t)e->NH * HS, *v = k + KVD;
        size_t co = (size_t)e->eslot[t] * slot_stride + (size_t)e->epos[t] * KVD;
        memcpy(kc + co, k, (size_t)KVD * 4);
        memcpy(vc + co, v, (size_t)KVD * 4);
    }
    if (fresh)
        e->k->attention_fwd(e->gemm, atty, e->lse, qkv, 1, T, e->NH, e->KVH, HS);
    else
        e->k->attention_kv(atty, qkv, (size_t)QKV, T, e->eslot, e->epos, kc, vc, slot_stride,
                           e->NH, e->KVH, HS, e->NCTX, e->scores);
}

static kiln_status step(kiln_ctx *ctx, kiln_engine *e, const kiln_engine_tok *toks,
                        int T, float *logits)
{
    if (T < 1 || T > e->opts.chunk)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "engine step: %d entries (1..%d allowed)", T, e->opts.chunk);
    memcpy(e->slot_next, e->pos, (size_t)e->S * sizeof(int));
    int nw = 0;
    for (int t = 0; t < T; t++) {
        int s = toks[t].slot;
        if (s < 0 || s >= e->S)
            return kiln_fail(ctx, KILN_ERR_RANGE, "engine step: slot %d out of range", s);
        if (toks[t].token < 0 || toks[t].token >= e->V)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "engine step: token %d out of range [0, %d)",
                             (int)toks[t].token, e->V);
        if (e->slot_next[s] >= e->NCTX)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "engine step: slot %d is full (context %d)", s, e->NCTX);
        e->eslot[t] = s;
        e->epos[t] = e->slot_next[s]++;
        if (toks[t].want_logits) e->wrow[nw++] = t;
    }
    const int C = e->C;
    /* embeddings, as the training forward's embed_fwd adds them */
    for (int t = 0; t < T; t++) {
        float *x = e->x + (size_t)t * C;
        const float *te = e->wte + (size_t)toks[t].token * C;
        if (e->wpe) {
            const float *pe = e->wpe + (size_t)e->epos[t] * C;
            for (int i = 0; i < C; i++) x[i] = te[i] + pe[i];
        } else {
            memcpy(x, te, (size_t)C * 4);
        }
    }
    e->step_T = T;
    model_run r = {.be = e->be, .s = &e->sh, .attend = attend, .ud = e};
    if (e->n_ad) group_rows(e, &r, T);
    /* the f32 backend's kern_act are fp32 rows: the scratch is them; the
     * SwiGLU product goes straight to fchp (tmp = fchp: nothing copied) */
    model_blk io = {.inp = e->x, .ln1p = (kern_act *)e->xn, .attyp = (kern_act *)e->att,
                    .ln2p = (kern_act *)e->xn, .fchp = (kern_act *)e->hid,
                    .actp = (kern_act *)e->ff, .ln1_mean = e->mean, .ln1_rstd = e->rstd,
                    .ln2_mean = e->mean, .ln2_rstd = e->rstd, .qkv = e->qkv, .tmp = e->hid,
                    .res2 = e->res2, .res3 = e->x};
    for (int l = 0; l < e->L; l++) model_block_fwd(&r, l, &e->lh[l], T, &io);
    if (nw > 0) {
        /* the final norm of the rows whose logits are wanted, compacted */
        const float *rows = e->x;
        if (nw < T) {
            for (int i = 0; i < nw; i++)
                memcpy(e->res2 + (size_t)i * C, e->x + (size_t)e->wrow[i] * C, (size_t)C * 4);
            rows = e->res2;
        }
        model_final_norm(&r, (kern_act *)e->xn, e->mean, e->rstd, rows, e->lnf_w, e->lnf_b, nw);
        if (e->hid_out)
            memcpy(e->hid_out, e->xn, (size_t)nw * C * sizeof(float));
        else
            e->k->linear(e->gemm, logits, e->xn, nw, &e->head, NULL);
    }
    memcpy(e->pos, e->slot_next, (size_t)e->S * sizeof(int));
    return KILN_OK;
}

kiln_status kiln_engine_step(kiln_ctx *ctx, kiln_engine *e,
                             const kiln_engine_tok *toks, int T, float *logits)
{
#ifdef _OPENMP
    /* the GEMM backend sizes its team from the caller's setting: run it on
     * the engine's thread count and restore the caller's afterwards */
    const int prev = omp_get_max_threads();
    if (prev != e->nth) omp_set_num_threads(e->nth);
    kiln_status st = step(ctx, e, toks, T, logits);
    if (prev != e->nth) omp_set_num_threads(prev);
    return st;
#else
    return step(ctx, e, toks, T, logits);
#endif
}

kiln_status kiln_engine_prefill(kiln_ctx *ctx, kiln_engine *e, int slot,
                                const int32_t *tokens, int n, float *logits)
{
    if (slot < 0 || slot >= e->S)
        return kiln_fail(ctx, KILN_ERR_RANGE, "engine prefill: slot %d out of range", slot);
    if (n < 1) return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "engine prefill: empty prompt");
    if (e->pos[slot] + n > e->NCTX)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "prompt of %d tokens does not fit the context (%d used of %d)",
                         n, e->pos[slot], e->NCTX);
    kiln_engine_tok *tk = kiln_malloc(ctx, (size_t)e->opts.chunk * sizeof *tk);
    if (!tk) return KILN_ERR_NOMEM;
    kiln_status st = KILN_OK;
    for (int i0 = 0; i0 < n && !st; i0 += e->opts.chunk) {
        int m = KILN_MIN(e->opts.chunk, n - i0);
        for (int j = 0; j < m; j++)
            tk[j] = (kiln_engine_tok){slot, tokens[i0 + j],
                                      logits && i0 + j == n - 1};
        st = kiln_engine_step(ctx, e, tk, m, logits);
    }
    free(tk);
    return st;
}

/* Prefix caching (kiln serve): the first n positions of src's cache
 * become dst's whole cache. Kept at the end of the file and free of the
 * step's internals: it only moves cache rows (L, S, NCTX, KVD). */
kiln_status kiln_engine_copy_prefix(kiln_ctx *ctx, kiln_engine *e, int dst, int src, int n)
{
    if (dst < 0 || dst >= e->S || src < 0 || src >= e->S)
        return kiln_fail(ctx, KILN_ERR_RANGE, "engine copy_prefix: slot %d or %d out of range [0, %d)",
                         dst, src, e->S);
    if (n < 0 || n > e->pos[src])
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "engine copy_prefix: %d positions asked, slot %d holds %d", n, src,
                         e->pos[src]);
    if (dst != src)
        for (int l = 0; l < e->L; l++) {
            size_t d = ((size_t)l * e->S + dst) * e->NCTX * e->KVD;
            size_t s = ((size_t)l * e->S + src) * e->NCTX * e->KVD;
            memcpy(e->kc + d, e->kc + s, (size_t)n * e->KVD * sizeof *e->kc);
            memcpy(e->vc + d, e->vc + s, (size_t)n * e->KVD * sizeof *e->vc);
        }
    e->pos[dst] = n;
    return KILN_OK;
}

/* Embeddings (kiln serve's /v1/embeddings): the tokens' final-norm hidden
 * states, pooled. Kept at the end of the file: the step itself only
 * learns to hand its normed rows over (hid_out) instead of the logits. */
kiln_status kiln_engine_embed(kiln_ctx *ctx, kiln_engine *e, int slot, const int32_t *tokens,
                              int n, kiln_pooling pooling, float *out)
{
    if (slot < 0 || slot >= e->S)
        return kiln_fail(ctx, KILN_ERR_RANGE, "engine embed: slot %d out of range [0, %d)", slot,
                         e->S);
    if (n < 1) return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "engine embed: no tokens");
    if (n > e->NCTX)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "engine embed: %d tokens do not fit the context of %d", n, e->NCTX);
    if (pooling != KILN_POOLING_MEAN && pooling != KILN_POOLING_LAST)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "engine embed: pooling = %d (KILN_POOLING_MEAN or KILN_POOLING_LAST)",
                         (int)pooling);
    const int C = e->C, chunk = e->opts.chunk;
    kiln_engine_tok *tk = kiln_malloc(ctx, (size_t)chunk * sizeof *tk);
    float *rows = kiln_malloc(ctx, (size_t)chunk * C * sizeof(float));
    double *acc = kiln_calloc(ctx, (size_t)C, sizeof(double));
    kiln_status st = tk && rows && acc ? KILN_OK : KILN_ERR_NOMEM;
    e->pos[slot] = 0;
    for (int i0 = 0; i0 < n && !st; i0 += chunk) {
        int m = KILN_MIN(chunk, n - i0), nw = 0;
        for (int j = 0; j < m; j++) {
            bool want = pooling == KILN_POOLING_MEAN || i0 + j == n - 1;
            tk[j] = (kiln_engine_tok){slot, tokens[i0 + j], want};
            nw += want;
        }
        e->hid_out = rows;
        st = kiln_engine_step(ctx, e, tk, m, NULL);
        e->hid_out = NULL;
        for (int r = 0; r < nw && !st; r++)
            for (int i = 0; i < C; i++) acc[i] += rows[(size_t)r * C + i];
    }
    if (!st) {
        double d = pooling == KILN_POOLING_MEAN ? n : 1;
        for (int i = 0; i < C; i++) out[i] = (float)(acc[i] / d);
    }
    e->pos[slot] = 0; /* the slot is left empty */
    free(tk); free(rows); free(acc);
    return st;
}
