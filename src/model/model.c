/*
 * model.c — the model object: parameter layout with HF names (one block,
 * named views), creation, GPT-2 initialisation, accessors, the activation
 * arena, and loading/saving a model directory (config.json +
 * model.safetensors). The forward and backward passes are in forward.c.
 */
#include "model/model.h"
#include "io/safetensors.h"

#include <fnmatch.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- layout ----------------------------------------------------------- */

typedef struct layout_state {
    kiln_model *m;
    float *base;       /* params or grads block (NULL: only count) */
    kiln_tensor_info *info; /* filled when non-NULL */
    int n;
    size_t off;
    bool names_failed;
} layout_state;

static float *add(layout_state *s, bool decay, int ndim, int64_t d0,
                  int64_t d1, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

static float *add(layout_state *s, bool decay, int ndim, int64_t d0,
                  int64_t d1, const char *fmt, ...)
{
    size_t numel = (size_t)d0 * (size_t)(ndim == 2 ? d1 : 1);
    if (s->info) {
        kiln_tensor_info *t = &s->info[s->n];
        char name[160];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(name, sizeof name, fmt, ap);
        va_end(ap);
        t->name = strdup(name);
        if (!t->name) s->names_failed = true;
        t->ndim = ndim;
        t->shape[0] = d0;
        t->shape[1] = ndim == 2 ? d1 : 0;
        t->shape[2] = t->shape[3] = 0;
        t->offset = s->off;
        t->numel = numel;
        t->decay = decay;
        t->dtype = KILN_DTYPE_F32;
        t->trainable = true;
        t->group = strdup(decay ? "decay" : "no_decay");
        if (!t->group) s->names_failed = true;
    }
    float *p = s->base ? s->base + s->off : NULL;
    s->off += numel;
    s->n++;
    return p;
}

/* Walks the tensors in block order. w (may be NULL) receives the views. */
static void layout(layout_state *s, model_weights *w)
{
    kiln_model *m = s->m;
    const kiln_config *c = &m->cfg;
    int C = m->C, F = m->F, V = m->V, HS = m->HS;
    model_weights tmp = {0};
    model_weights *W = w ? w : &tmp;
    if (c->arch == KILN_ARCH_GPT2) {
        W->wte = add(s, false, 2, V, C, "transformer.wte.weight");
        W->wpe = add(s, false, 2, c->n_ctx, C, "transformer.wpe.weight");
    } else {
        W->wte = add(s, false, 2, V, C, "model.embed_tokens.weight");
        W->wpe = NULL;
    }
    for (int l = 0; l < m->L; l++) {
        if (m->layer_off && s->info) m->layer_off[l] = s->off;
        model_layer tl = {0};
        model_layer *ly = w ? &W->layers[l] : &tl;
        if (c->arch == KILN_ARCH_GPT2) {
            const char *p = "transformer.h";
            ly->ln1_w = add(s, false, 1, C, 0, "%s.%d.ln_1.weight", p, l);
            ly->ln1_b = add(s, false, 1, C, 0, "%s.%d.ln_1.bias", p, l);
            ly->qkv_w = add(s, true, 2, C, 3 * C, "%s.%d.attn.c_attn.weight", p, l);
            ly->qkv_b = add(s, false, 1, 3 * C, 0, "%s.%d.attn.c_attn.bias", p, l);
            ly->proj_w = add(s, true, 2, C, C, "%s.%d.attn.c_proj.weight", p, l);
            ly->proj_b = add(s, false, 1, C, 0, "%s.%d.attn.c_proj.bias", p, l);
            ly->ln2_w = add(s, false, 1, C, 0, "%s.%d.ln_2.weight", p, l);
            ly->ln2_b = add(s, false, 1, C, 0, "%s.%d.ln_2.bias", p, l);
            ly->fc_w = add(s, true, 2, C, F, "%s.%d.mlp.c_fc.weight", p, l);
            ly->fc_b = add(s, false, 1, F, 0, "%s.%d.mlp.c_fc.bias", p, l);
            ly->fcproj_w = add(s, true, 2, F, C, "%s.%d.mlp.c_proj.weight", p, l);
            ly->fcproj_b = add(s, false, 1, C, 0, "%s.%d.mlp.c_proj.bias", p, l);
        } else {
            const char *p = "model.layers";
            int QH = m->NH * HS, KH = m->KVH * HS;
            ly->ln1_w = add(s, false, 1, C, 0, "%s.%d.input_layernorm.weight", p, l);
            ly->qkv_w = add(s, true, 2, QH, C, "%s.%d.self_attn.q_proj.weight", p, l);
            add(s, true, 2, KH, C, "%s.%d.self_attn.k_proj.weight", p, l);
            add(s, true, 2, KH, C, "%s.%d.self_attn.v_proj.weight", p, l);
            if (c->bias || c->qkv_bias) { /* qkv_bias: qwen2, no o_proj bias */
                ly->qkv_b = add(s, false, 1, QH, 0, "%s.%d.self_attn.q_proj.bias", p, l);
                add(s, false, 1, KH, 0, "%s.%d.self_attn.k_proj.bias", p, l);
                add(s, false, 1, KH, 0, "%s.%d.self_attn.v_proj.bias", p, l);
            }
            ly->proj_w = add(s, true, 2, C, QH, "%s.%d.self_attn.o_proj.weight", p, l);
            if (c->bias)
                ly->proj_b = add(s, false, 1, C, 0, "%s.%d.self_attn.o_proj.bias", p, l);
            ly->ln2_w = add(s, false, 1, C, 0, "%s.%d.post_attention_layernorm.weight", p, l);
            ly->fc_w = add(s, true, 2, F, C, "%s.%d.mlp.gate_proj.weight", p, l);
            add(s, true, 2, F, C, "%s.%d.mlp.up_proj.weight", p, l);
            ly->fcproj_w = add(s, true, 2, C, F, "%s.%d.mlp.down_proj.weight", p, l);
        }
        /* the layer's LoRA adapters after its own tensors (lora.c) */
        const char *pre = c->arch == KILN_ARCH_GPT2 ? "transformer.h" : "model.layers";
        for (int k = 0; c->lora_rank > 0 && k < kiln_lora_num_slots(c->arch); k++) {
            if (!(c->lora_targets >> k & 1)) continue;
            model_lora_slot sl = model_lora_slot_of(c, k);
            const char *mod = kiln_lora_slot_name(c->arch, k);
            ly->lora_a[k] = add(s, true, 2, c->lora_rank, sl.in, "%s.%d.%s.lora_A.weight", pre,
                                l, mod);
            ly->lora_b[k] = add(s, true, 2, sl.out, c->lora_rank, "%s.%d.%s.lora_B.weight", pre,
                                l, mod);
        }
    }
    if (m->layer_off && s->info) m->layer_off[m->L] = s->off;
    if (c->arch == KILN_ARCH_GPT2) {
        W->lnf_w = add(s, false, 1, C, 0, "transformer.ln_f.weight");
        W->lnf_b = add(s, false, 1, C, 0, "transformer.ln_f.bias");
    } else {
        W->lnf_w = add(s, false, 1, C, 0, "model.norm.weight");
        W->lnf_b = NULL;
    }
    if (c->tie_embeddings) W->lm_head = W->wte;
    else W->lm_head = add(s, true, 2, V, C, "lm_head.weight");
    if (m->layer_off && s->info) m->layer_off[m->L + 1] = s->off;
}

static void set_views(kiln_model *m, float *base, model_weights *w)
{
    layout_state s = {.m = m, .base = base};
    layout(&s, w);
}

/* ---- creation --------------------------------------------------------- */

/* Frees m's kernels: the backend (which owns its GEMM), or the GEMM. */
static void drop_kernels(kiln_model *m)
{
    if (m->be) kern_backend_free(m->be);
    else kern_gemm_free(m->gemm);
    m->be = NULL;
    m->gemm = NULL;
}

void model_use_backend(kiln_model *m, kern_backend *be)
{
    /* bf16 activations stored in another backend's layout: be cannot read
     * them (no backward from them), and the arena is resized for be's
     * layout at the next forward */
    bool relayout = m->act_mp && (!m->be || m->be->mp.act_bytes != be->mp.act_bytes);
    drop_kernels(m);
    m->be = be;
    m->ops = be->ops;
    m->gemm = be->gemm;
    if (relayout) m->B = m->T = m->B_cap = m->T_cap = 0;
}

void model_use_ref_kernels(kiln_model *m, bool ref)
{
    drop_kernels(m);
    if (ref) {
        m->ops = kern_ops_ref();
        m->gemm = kern_gemm_ref();
    } else {
        m->ops = kern_ops_fast();
        m->gemm = kern_gemm_fast_new();
        if (!m->gemm) {
            m->ops = kern_ops_ref();
            m->gemm = kern_gemm_ref();
        }
    }
}

static void rope_tables(kiln_model *m)
{
    int half = m->HS / 2;
    for (int i = 0; i < half; i++) {
        /* As HF computes it in fp32: inv_freq = 1 / theta^(2i/HS), then
         * freqs = t * inv_freq (fp32 product), then cos/sin. */
        float inv = 1.0f / powf(m->cfg.rope_theta, (float)(2 * i) / (float)m->HS);
        for (int t = 0; t < m->cfg.n_ctx; t++) {
            float f = (float)t * inv;
            m->rope_cos[(size_t)t * half + i] = (float)cos((double)f);
            m->rope_sin[(size_t)t * half + i] = (float)sin((double)f);
            m->rope_nsin[(size_t)t * half + i] = -m->rope_sin[(size_t)t * half + i];
        }
    }
}

kiln_status kiln_model_new(kiln_ctx *ctx, const kiln_config *cfg,
                           kiln_model **out)
{
    *out = NULL;
    kiln_status s = kiln_config_validate(ctx, cfg);
    if (s) return s;
    kiln_model *m = kiln_calloc(ctx, 1, sizeof *m);
    if (!m) return KILN_ERR_NOMEM;
    m->cfg = *cfg;
    m->L = cfg->n_layer;
    m->C = cfg->n_embd;
    m->NH = cfg->n_head;
    m->KVH = cfg->n_kv_head;
    m->HS = cfg->n_embd / cfg->n_head;
    m->QKV = (m->NH + 2 * m->KVH) * m->HS;
    m->F = cfg->n_inner;
    m->V = cfg->vocab_size;
    m->threads = kiln_get_threads(ctx);
    layout_state cnt = {.m = m};
    layout(&cnt, NULL);
    m->num_params = cnt.off;
    m->n_tensors = cnt.n;
    KILN_ASSERT(m->num_params == kiln_config_num_params(cfg));
    m->tensors = kiln_calloc(ctx, (size_t)m->n_tensors, sizeof(kiln_tensor_info));
    m->layer_off = kiln_calloc(ctx, (size_t)m->L + 2, sizeof(size_t));
    m->w.layers = kiln_calloc(ctx, (size_t)m->L, sizeof(model_layer));
    m->g.layers = kiln_calloc(ctx, (size_t)m->L, sizeof(model_layer));
    m->gf.layers = kiln_calloc(ctx, (size_t)m->L, sizeof(model_layer));
    m->fixup = kiln_calloc(ctx, (size_t)m->n_tensors, sizeof(int));
    m->weights_changed = true;
    m->params = kiln_aligned_alloc(ctx, m->num_params * sizeof(float));
    if (cfg->arch == KILN_ARCH_LLAMA) {
        size_t n = (size_t)cfg->n_ctx * (size_t)(m->HS / 2);
        m->rope_cos = kiln_aligned_alloc(ctx, n * sizeof(float));
        m->rope_sin = kiln_aligned_alloc(ctx, n * sizeof(float));
        m->rope_nsin = kiln_aligned_alloc(ctx, n * sizeof(float));
    }
    if (!m->tensors || !m->layer_off || !m->w.layers || !m->g.layers || !m->gf.layers ||
        !m->fixup ||
        !m->params || (cfg->arch == KILN_ARCH_LLAMA && (!m->rope_cos || !m->rope_sin || !m->rope_nsin))) {
        kiln_model_free(m);
        return kiln_fail(ctx, KILN_ERR_NOMEM,
                         "out of memory creating a model of %zu parameters (%.1f GiB)",
                         cnt.off, (double)cnt.off * 4 / (1u << 30));
    }
    layout_state full = {.m = m, .base = m->params, .info = m->tensors};
    layout(&full, &m->w);
    if (full.names_failed) {
        kiln_model_free(m);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    if (m->rope_cos) rope_tables(m);
    model_use_ref_kernels(m, false);
    m->fb = kern_backend_f32_new(m->ops, m->gemm, false, false);
    if (!m->fb) {
        kiln_model_free(m);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    if ((s = model_lora_finish(ctx, m))) { /* a LoRA model's base is frozen */
        kiln_model_free(m);
        return s;
    }
    *out = m;
    return KILN_OK;
}

void kiln_model_free(kiln_model *m)
{
    if (!m) return;
    if (m->tensors)
        for (int i = 0; i < m->n_tensors; i++) {
            free((char *)m->tensors[i].name);
            free((char *)m->tensors[i].group);
        }
    free(m->tensors);
    free(m->gf.layers);
    free(m->fixup);
    free(m->layer_off);
    free(m->w.layers);
    free(m->g.layers);
    free(m->params);
    free(m->grads);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->rope_nsin);
    drop_kernels(m);
    kern_backend_free(m->fb);
    model_upd_free(m);
    arena_free(&m->act);
    free(m);
}

void kiln_model_init_random(kiln_model *m, uint64_t seed)
{
    /* Each tensor draws from its own stream (seed, tensor index), so
     * initialisation does not depend on thread count or tensor order. */
    model_params_touched(m);
    float resid_std = 0.02f / sqrtf(2.0f * (float)m->L);
    for (int i = 0; i < m->n_tensors; i++) {
        const kiln_tensor_info *t = &m->tensors[i];
        float *p = m->params + t->offset;
        const char *n = t->name;
        size_t len = strlen(n);
        bool is_norm = strstr(n, "ln_") || strstr(n, "layernorm") ||
                       !strcmp(n, "model.norm.weight");
        bool is_bias = len > 5 && !strcmp(n + len - 5, ".bias");
        if (is_bias) {
            memset(p, 0, t->numel * sizeof(float));
            continue;
        }
        if (is_norm) {
            for (size_t k = 0; k < t->numel; k++) p[k] = 1.0f;
            continue;
        }
        bool resid = strstr(n, "attn.c_proj.weight") || strstr(n, "mlp.c_proj.weight") ||
                     strstr(n, "o_proj.weight") || strstr(n, "down_proj.weight");
        float std = resid ? resid_std : 0.02f;
        kiln_rng r;
        kiln_rng_seed(&r, seed * 0x9E3779B97F4A7C15ULL + (uint64_t)i + 1);
        for (size_t k = 0; k < t->numel; k++) p[k] = std * kiln_rng_normal(&r);
    }
}

const kiln_config *kiln_model_config(const kiln_model *m) { return &m->cfg; }
size_t kiln_model_num_params(const kiln_model *m) { return m->num_params; }

/* ---- parameter access ----------------------------------------------------
 * The packed bf16/fp16 copies of the weights (the x86 backend's cache) are
 * re-derived at a forward when weights_changed says the parameters were
 * written since the last one, or always once the block was handed out for
 * writing (params_shared). Only the library's optimizer step keeps copies
 * it refreshed itself (model_params_stepped). */

void model_params_touched(kiln_model *m)
{
    m->weights_changed = true;
    if (m->gemm && m->gemm->invalidate) m->gemm->invalidate(m->gemm);
}

float *model_params_write(kiln_model *m)
{
    model_params_touched(m);
    return m->params;
}

void model_params_stepped(kiln_model *m) { m->weights_changed = true; }

const float *kiln_model_params(const kiln_model *m) { return m->params; }

float *kiln_model_params_mut(kiln_model *m)
{
    m->params_shared = true;
    return model_params_write(m);
}

kiln_status kiln_model_set_tensor(kiln_ctx *ctx, kiln_model *m, const char *name,
                                  const float *data, size_t numel)
{
    int i = name ? kiln_model_find_tensor(m, name) : -1;
    if (i < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_model_set_tensor: the model has no tensor \"%s\" "
                         "(kiln_model_tensor lists the names)", name ? name : "(null)");
    const kiln_tensor_info *t = &m->tensors[i];
    if (numel != t->numel)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_model_set_tensor: tensor \"%s\" has %zu elements, "
                         "not %zu", name, t->numel, numel);
    model_params_touched(m);
    memcpy(m->params + t->offset, data, numel * sizeof(float));
    return KILN_OK;
}

const float *kiln_model_grads(const kiln_model *m)
{
    /* Lazily zeroed matrices (bf16) are written out first: the values
     * read are the gradients whatever the model keeps implicit. The model
     * is never a const object (kiln_model_new allocates it). */
    model_grads_materialize((kiln_model *)m);
    return m->grads;
}
float *model_grads_deferred(kiln_model *m) { return m->grads; }
int kiln_model_num_tensors(const kiln_model *m) { return m->n_tensors; }

const kiln_tensor_info *kiln_model_tensor(const kiln_model *m, int i)
{
    return (i >= 0 && i < m->n_tensors) ? &m->tensors[i] : NULL;
}

int kiln_model_find_tensor(const kiln_model *m, const char *name)
{
    for (int i = 0; i < m->n_tensors; i++)
        if (!strcmp(m->tensors[i].name, name)) return i;
    return -1;
}

/* ---- trainable tensors and groups ---------------------------------------- */

static bool name_matches(const char *pattern, const char *name)
{
    return !strcmp(pattern, name) || fnmatch(pattern, name, 0) == 0;
}

size_t kiln_model_num_trainable(const kiln_model *m)
{
    size_t n = 0;
    for (int i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].trainable) n += m->tensors[i].numel;
    return n;
}

bool model_range_frozen(const kiln_model *m, size_t off, size_t len)
{
    for (int i = 0; i < m->n_tensors; i++) {
        const kiln_tensor_info *t = &m->tensors[i];
        if (t->offset < off + len && off < t->offset + t->numel && t->trainable) return false;
    }
    return true;
}

/* Every gradient view (a pointer field of model_weights) with its offset. */
typedef struct gview {
    float **gf; /* the field in m->gf */
    size_t off;
} gview;

static int gview_cmp(const void *a, const void *b)
{
    const gview *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* m->gf from m->g: a view is NULL when every tensor of its span (from its
 * offset to the next view's: a fused matrix spans several tensors) is
 * frozen; frozen tensors in a span with trainable ones go to m->fixup. */
static void grad_views_update(kiln_model *m)
{
    m->any_frozen = false;
    for (int i = 0; i < m->n_tensors; i++)
        if (!m->tensors[i].trainable) m->any_frozen = true;
    m->n_fixup = 0;
    if (!m->grads) return;
    model_layer *keep = m->gf.layers;
    memcpy(keep, m->g.layers, (size_t)m->L * sizeof *keep);
    m->gf = m->g;
    m->gf.layers = keep;
    if (!m->any_frozen) return;
    enum { PER = 12 + 2 * KILN_LORA_MAX_SLOTS };
    gview v[5 + PER * 64], *vp = v;
    int cap = 5 + PER * m->L, n = 0;
    if (m->L > 64) {
        vp = malloc((size_t)cap * sizeof *vp);
        KILN_ASSERT(vp);
    }
    float **top[] = {&m->gf.wte, &m->gf.wpe, &m->gf.lnf_w, &m->gf.lnf_b, &m->gf.lm_head};
    for (int k = 0; k < 5; k++)
        if (*top[k] && !(k == 4 && m->gf.lm_head == m->gf.wte))
            vp[n++] = (gview){top[k], (size_t)(*top[k] - m->grads)};
    for (int l = 0; l < m->L; l++) {
        model_layer *y = &m->gf.layers[l];
        float **f[] = {&y->ln1_w, &y->ln1_b, &y->qkv_w, &y->qkv_b, &y->proj_w, &y->proj_b,
                       &y->ln2_w, &y->ln2_b, &y->fc_w, &y->fc_b, &y->fcproj_w, &y->fcproj_b};
        for (int k = 0; k < 12; k++)
            if (*f[k]) vp[n++] = (gview){f[k], (size_t)(*f[k] - m->grads)};
        /* the adapters are views of their own: the span of the layer's
         * last base matrix ends where they begin */
        for (int k = 0; k < KILN_LORA_MAX_SLOTS; k++) {
            if (y->lora_a[k]) vp[n++] = (gview){&y->lora_a[k], (size_t)(y->lora_a[k] - m->grads)};
            if (y->lora_b[k]) vp[n++] = (gview){&y->lora_b[k], (size_t)(y->lora_b[k] - m->grads)};
        }
    }
    qsort(vp, (size_t)n, sizeof *vp, gview_cmp);
    for (int j = 0; j < n; j++) {
        size_t a = vp[j].off, b = j + 1 < n ? vp[j + 1].off : m->num_params;
        bool all = true, some = false;
        for (int i = 0; i < m->n_tensors; i++) {
            const kiln_tensor_info *t = &m->tensors[i];
            if (t->offset < a || t->offset >= b) continue;
            if (t->trainable) all = false;
            else some = true;
        }
        if (all) {
            *vp[j].gf = NULL;
        } else if (some) {
            for (int i = 0; i < m->n_tensors; i++) {
                const kiln_tensor_info *t = &m->tensors[i];
                if (t->offset >= a && t->offset < b && !t->trainable) m->fixup[m->n_fixup++] = i;
            }
        }
    }
    if (m->cfg.tie_embeddings) m->gf.lm_head = m->gf.wte; /* one tensor */
    if (vp != v) free(vp);
}

model_weights *model_grad_views(kiln_model *m) { return m->any_frozen ? &m->gf : &m->g; }

void model_grad_fixup(kiln_model *m, size_t begin, size_t end)
{
    for (int j = 0; j < m->n_fixup; j++) {
        const kiln_tensor_info *t = &m->tensors[m->fixup[j]];
        if (t->offset >= begin && t->offset < end)
            memset(m->grads + t->offset, 0, t->numel * sizeof(float));
    }
}

kiln_status kiln_model_set_trainable(kiln_ctx *ctx, kiln_model *m, const char *pattern,
                                     bool trainable, int *matched)
{
    if (matched) *matched = 0;
    if (!pattern || !*pattern)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_model_set_trainable: empty pattern (give a tensor name or a "
                         "glob such as \"*.attn.*\")");
    int n = 0;
    for (int i = 0; i < m->n_tensors; i++)
        if (name_matches(pattern, m->tensors[i].name)) n++;
    if (!n)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "pattern \"%s\" matches no tensor of the model (names are HF's, "
                         "e.g. \"%s\"; globs: '*' any characters, '?' one, [abc] a set)",
                         pattern, m->tensors[m->n_tensors > 2 ? 2 : 0].name);
    for (int i = 0; i < m->n_tensors; i++) {
        kiln_tensor_info *t = &m->tensors[i];
        if (!name_matches(pattern, t->name)) continue;
        t->trainable = trainable;
        /* a frozen tensor's gradient reads as zeros from now on */
        if (!trainable && m->grads) memset(m->grads + t->offset, 0, t->numel * sizeof(float));
    }
    grad_views_update(m);
    if (matched) *matched = n;
    return KILN_OK;
}

static bool group_name_ok(const char *g)
{
    size_t len = g ? strlen(g) : 0;
    if (len < 1 || len > 63) return false;
    for (size_t i = 0; i < len; i++) {
        char c = g[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return false;
    }
    return true;
}

kiln_status kiln_model_set_group(kiln_ctx *ctx, kiln_model *m, const char *pattern,
                                 const char *group, int *matched)
{
    if (matched) *matched = 0;
    if (!group_name_ok(group))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_model_set_group: group \"%s\" is not a name of 1 to 63 "
                         "characters from [A-Za-z0-9_.-]", group ? group : "(null)");
    int n = 0;
    for (int i = 0; i < m->n_tensors; i++)
        if (pattern && name_matches(pattern, m->tensors[i].name)) n++;
    if (!n)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_model_set_group: pattern \"%s\" matches no tensor of the model",
                         pattern ? pattern : "(null)");
    for (int i = 0; i < m->n_tensors; i++) {
        kiln_tensor_info *t = &m->tensors[i];
        if (!name_matches(pattern, t->name)) continue;
        char *g = strdup(group);
        if (!g) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        free((char *)t->group);
        t->group = g;
        t->decay = !strcmp(g, "decay");
    }
    if (matched) *matched = n;
    return KILN_OK;
}

void kiln_model_set_grad_hook(kiln_model *m, kiln_grad_ready_fn fn, void *ud)
{
    m->hook = fn;
    m->hook_ud = ud;
}

void kiln_model_zero_grad(kiln_model *m)
{
    if (m->grads) model_grads_zero(m);
}

/* ---- activations ------------------------------------------------------ */

size_t model_act_bytes(const kiln_model *m, int B, int T)
{
    return model_pass_act_bytes(m, B, T);
}

kiln_status kiln_model_prepare(kiln_ctx *ctx, kiln_model *m, int B, int T)
{
    if (B < 1 || B > (1 << 20))
        return kiln_fail(ctx, KILN_ERR_RANGE, "batch size B = %d is outside [1, %d]", B, 1 << 20);
    if (T < 1 || T > m->cfg.n_ctx)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "sequence length T = %d is outside [1, %d], the model's context "
                         "length", T, m->cfg.n_ctx);
    if (!m->grads) {
        m->grads = kiln_aligned_alloc(ctx, m->num_params * sizeof(float));
        if (!m->grads) return KILN_ERR_NOMEM;
        memset(m->grads, 0, m->num_params * sizeof(float));
        set_views(m, m->grads, &m->g);
        grad_views_update(m);
    }
    int nB = KILN_MAX(B, m->B_cap), nT = KILN_MAX(T, m->T_cap);
    bool mp = model_bf16_acts(m);
    if (nB == m->B_cap && nT == m->T_cap && mp == m->act_mp) return KILN_OK;
    /* Size in double first: B * NH * T^2 * L can overflow size_t long
     * before malloc would refuse. Kernels index rows with int. */
    double approx = (double)nB * nT *
                    ((double)m->L * (8.0 * m->C + m->QKV + 3.0 * m->F + (double)m->NH * nT) +
                     m->V + 4.0 * m->C + 2.0 * m->F + m->QKV + (double)m->NH * nT) * 4.0;
    if ((double)nB * nT > 1073741824.0 || approx > 1.1e15)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "batch %d x sequence %d needs about %.3g GiB of activations, "
                         "beyond what kiln supports; lower B or T",
                         nB, nT, approx / (1u << 30));
    size_t bytes = model_pass_act_bytes(m, nB, nT);
    arena_free(&m->act);
    m->B_cap = m->T_cap = 0;
    m->B = m->T = 0;
    kiln_status s = arena_init(ctx, &m->act, bytes);
    if (s)
        return kiln_fail(ctx, KILN_ERR_NOMEM,
                         "out of memory allocating %.2f GiB of activations for batch %d "
                         "x sequence %d; lower B or T",
                         (double)bytes / (1u << 30), nB, nT);
    m->B_cap = nB;
    m->T_cap = nT;
    m->act_mp = mp;
    return KILN_OK;
}

/* ---- loading and saving ------------------------------------------------ */

kiln_status model_load_weights(kiln_ctx *ctx, kiln_model *m, const char *dir)
{
    st_set f;
    kiln_status s = st_set_open_dir(ctx, dir, &f);
    if (s) return s;
    /* messages name the file holding the tensor; a tensor in no file,
     * the single file or the directory of shards */
    const char *none = f.n_files == 1 ? f.paths[0] : dir, *path = none;
    /* Original GPT-2 checkpoints name tensors without "transformer.". */
    bool bare = m->cfg.arch == KILN_ARCH_GPT2 &&
                !st_set_find(&f, "transformer.wte.weight", NULL) &&
                st_set_find(&f, "wte.weight", NULL);
    for (int i = 0; i < m->n_tensors && !s; i++) {
        const kiln_tensor_info *ti = &m->tensors[i];
        const char *name = ti->name;
        if (bare && !strncmp(name, "transformer.", 12)) name += 12;
        int fi = 0;
        const st_tensor *t = st_set_find(&f, name, &fi);
        path = t ? f.paths[fi] : none;
        if (!t) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: tensor \"%s\" is missing%s (is config.json for this "
                          "file?)", path, name,
                          f.n_files > 1 ? " from every shard" : "");
            break;
        }
        bool ok = t->ndim == ti->ndim;
        for (int d = 0; ok && d < ti->ndim; d++) ok = t->shape[d] == ti->shape[d];
        if (!ok) {
            char want[64], got[96];
            int k = 0;
            for (int d = 0; d < ti->ndim; d++)
                k += snprintf(want + k, sizeof want - (size_t)k, "%s%lld", d ? ", " : "",
                              (long long)ti->shape[d]);
            k = 0;
            for (int d = 0; d < t->ndim && k < 80; d++)
                k += snprintf(got + k, sizeof got - (size_t)k, "%s%lld", d ? ", " : "",
                              (long long)t->shape[d]);
            if (t->ndim == 0) got[0] = 0;
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: tensor \"%s\" has shape [%s] but config.json implies [%s]",
                          path, name, got, want);
            break;
        }
        model_params_touched(m);
        s = st_read_f32(ctx, &f.files[fi], t, path, m->params + ti->offset);
    }
    if (!s) {
        /* Non-finite weights poison everything downstream: say so now. */
        for (size_t i = 0; i < m->num_params; i++)
            if (!isfinite(m->params[i])) {
                int ti = 0;
                while (ti + 1 < m->n_tensors && m->tensors[ti + 1].offset <= i) ti++;
                int fi = 0;
                st_set_find(&f, m->tensors[ti].name, &fi);
                s = kiln_fail(ctx, KILN_ERR_NUMERIC,
                              "%s: tensor \"%s\" contains NaN or infinity", f.paths[fi],
                              m->tensors[ti].name);
                break;
            }
    }
    st_set_close(&f);
    return s;
}

kiln_status kiln_model_load(kiln_ctx *ctx, const char *dir, kiln_model **out)
{
    *out = NULL;
    char *cpath = file_join(dir, "config.json");
    kiln_status s = KILN_OK;
    kiln_model *m = NULL;
    kiln_config cfg;
    if (!cpath) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto done;
    }
    if (!file_is_dir(dir) && file_exists(dir) && gguf_is_gguf(dir)) {
        s = model_load_gguf(ctx, dir, &m);
        if (!s) *out = m;
        m = NULL;
        goto done;
    }
    if (!file_is_dir(dir)) {
        s = kiln_fail(ctx, KILN_ERR_IO,
                      "'%s' is not a model directory (expected config.json and "
                      "model.safetensors or model.safetensors.index.json with its "
                      "shards in it) nor a GGUF file", dir);
        goto done;
    }
    if ((s = kiln_config_load(ctx, cpath, &cfg))) goto done;
    if ((s = kiln_model_new(ctx, &cfg, &m))) goto done;
    if ((s = model_load_weights(ctx, m, dir))) goto done;
    *out = m;
    m = NULL;
done:
    kiln_model_free(m);
    free(cpath);
    return s;
}

kiln_status kiln_model_save(kiln_ctx *ctx, const kiln_model *m, const char *dir)
{
    kiln_status s = file_mkdirs(ctx, dir);
    if (s) return s;
    char *cpath = file_join(dir, "config.json");
    char *wpath = file_join(dir, "model.safetensors");
    st_entry *e = calloc((size_t)m->n_tensors, sizeof *e);
    if (!cpath || !wpath || !e) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int i = 0; i < m->n_tensors; i++) {
        const kiln_tensor_info *t = &m->tensors[i];
        e[i].name = t->name;
        e[i].dtype = KILN_DTYPE_F32;
        e[i].ndim = t->ndim;
        e[i].shape[0] = t->shape[0];
        e[i].shape[1] = t->shape[1];
        e[i].data = m->params + t->offset;
    }
    /* Weights first: a directory whose config.json is new always has
     * matching weights. */
    if ((s = st_save(ctx, wpath, e, m->n_tensors, NULL, 0))) goto done;
    /* an index left from a sharded checkpoint would win over the new file */
    char *ipath = file_join(dir, "model.safetensors.index.json");
    if (ipath && file_exists(ipath) && remove(ipath) != 0)
        s = kiln_fail(ctx, KILN_ERR_IO, "%s: cannot remove the stale index of a sharded "
                      "checkpoint; delete it", ipath);
    free(ipath);
    if (!s) s = kiln_config_save(ctx, cpath, &m->cfg);
done:
    free(e);
    free(cpath);
    free(wpath);
    return s;
}
