/*
 * engine.c — the inference engine: packed weights, a KV cache per slot and
 * one forward step that serves prefill, batched decode and both mixed.
 *
 * A step takes T entries (slot, token). Each entry is appended to its
 * slot's cache at that slot's next position, so a prefill chunk is T
 * entries of one slot, a decode step is one entry per active slot, and the
 * scheduler may mix them. Every matrix is streamed once per step for all T
 * entries (ik_linear), which is what makes a batch of sequences cost about
 * the same memory traffic as one. K and V of all entries are written to
 * the cache before attention, and entry t attends to positions <= its own,
 * which is causal masking for a prefill chunk and independence for
 * sequences in different slots.
 *
 * Both families: gpt2 (learned positions, LayerNorm, GELU-tanh, biases)
 * and llama (RoPE rotate-half as in HF, RMSNorm, SwiGLU, GQA).
 */
#include "infer/infer.h"
#include "kernels/kernels.h"

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

typedef struct ilayer {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b; /* (C); _b NULL for rmsnorm */
    imat qkv; float *qkv_b;  /* (C + 2*KVD, C) rows: q, k, v */
    imat o;   float *o_b;    /* (C, C) */
    imat up;  float *up_b;   /* gpt2 (F, C); llama (2F, C) rows: gate, up */
    imat down; float *down_b; /* (C, F) */
} ilayer;

struct kiln_engine {
    kiln_config cfg;
    kiln_engine_opts opts;
    int C, HS, KVD, F, V, L, NH, KVH, S, NCTX;
    float *wte;   /* (V, C) fp32, token lookup */
    float *wpe;   /* (n_ctx, C) gpt2 */
    float *lnf_w, *lnf_b; /* (C) */
    imat head;    /* (V, C) */
    ilayer *layers; /* (L) */
    float *rope_cos, *rope_sin; /* (NCTX, HS/2) llama */
    float *kc, *vc; /* (L, S, NCTX, KVD) */
    int *pos;       /* (S) */
    /* scratch for T = opts.chunk entries */
    float *x, *xn, *qkv, *att, *hid, *ff; /* (T,C) (T,C) (T,C+2KVD) (T,C) (T,2F) (T,F) */
    float *scores;  /* (T, NH, NCTX) */
    int *epos;      /* (T) */
    int *wrow;      /* (T) */
    int *slot_next; /* (S) */
    size_t weight_bytes;
    int nth;        /* OpenMP threads */
    kern_gemm *gemm; /* the library's fastest GEMM (oneDNN when built with
                        it), used for fp32 prefill chunks */
    bool own_wte;
    bool head_is_wte;
};

kiln_engine_opts kiln_engine_opts_default(void)
{
    return (kiln_engine_opts){.n_slots = 1, .n_ctx = 0, .chunk = 64,
                              .wtype = KILN_DTYPE_F32};
}

/* ---- building ------------------------------------------------------ */

typedef struct part {
    const char *name;
    int rows; /* rows of this part in the packed (out, in) matrix */
} part;

static const float *get(kiln_ctx *ctx, infer_src_fn src, void *ud,
                        const char *name, int *ndim, int64_t *shape,
                        bool required, kiln_status *st)
{
    const float *p = src(ud, name, ndim, shape);
    if (!p && required)
        *st = kiln_fail(ctx, KILN_ERR_FORMAT,
                        "model has no tensor '%s' (needed for inference)", name);
    return p;
}

/* Packs the parts (stacked by rows) into m (rows, cols), transposing a part
 * stored (in, out) (HF Conv1D) when conv1d says so or when its shape can
 * only be read that way. */
static kiln_status pack(kiln_ctx *ctx, kiln_engine *e, infer_src_fn src,
                        void *ud, imat *m, const part *parts, int np,
                        int cols, bool conv1d)
{
    kiln_status st = KILN_OK;
    int rows = 0;
    for (int i = 0; i < np; i++) rows += parts[i].rows;
    m->rows = rows;
    m->cols = cols;
    m->f32 = NULL;
    m->bf16 = NULL;
    size_t n = (size_t)rows * cols;
    bool bf = e->opts.wtype == KILN_DTYPE_BF16;
    if (bf) m->bf16 = kiln_aligned_alloc(ctx, n * 2 + 64);
    else m->f32 = kiln_aligned_alloc(ctx, n * 4 + 64);
    if (!m->bf16 && !m->f32) return KILN_ERR_NOMEM;
    e->weight_bytes += n * (bf ? 2 : 4);
    int r0 = 0;
    for (int i = 0; i < np; i++) {
        int ndim;
        int64_t sh[4] = {0};
        const float *p = get(ctx, src, ud, parts[i].name, &ndim, sh, true, &st);
        if (!p) return st;
        int pr = parts[i].rows;
        bool direct = ndim == 2 && sh[0] == pr && sh[1] == cols;
        bool trans = ndim == 2 && sh[0] == cols && sh[1] == pr;
        if (!direct && !trans)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "tensor '%s' has shape (%lld, %lld); expected (%d, %d) "
                             "for this config",
                             parts[i].name, (long long)sh[0], (long long)sh[1], pr, cols);
        if (direct && trans) trans = conv1d;
        for (int r = 0; r < pr; r++)
            for (int c = 0; c < cols; c++) {
                float v = trans ? p[(size_t)c * pr + r] : p[(size_t)r * cols + c];
                size_t o = (size_t)(r0 + r) * cols + c;
                if (bf) m->bf16[o] = f32_to_bf16(v);
                else m->f32[o] = v;
            }
        r0 += pr;
    }
    return KILN_OK;
}

/* Copies a vector tensor of n floats (or the concatenation of parts);
 * missing optional tensors give NULL (treated as zeros / absent). */
static kiln_status vec(kiln_ctx *ctx, infer_src_fn src, void *ud,
                       float **out, const part *parts, int np, bool required)
{
    kiln_status st = KILN_OK;
    *out = NULL;
    int n = 0;
    for (int i = 0; i < np; i++) n += parts[i].rows;
    int have = 0;
    for (int i = 0; i < np; i++) {
        int ndim;
        int64_t sh[4] = {0};
        if (src(ud, parts[i].name, &ndim, sh)) have++;
    }
    if (have == 0 && !required) return KILN_OK;
    float *v = kiln_aligned_alloc(ctx, (size_t)n * 4 + 64);
    if (!v) return KILN_ERR_NOMEM;
    int o = 0;
    for (int i = 0; i < np; i++) {
        int ndim;
        int64_t sh[4] = {0};
        const float *p = get(ctx, src, ud, parts[i].name, &ndim, sh, true, &st);
        if (!p) {
            free(v);
            return st;
        }
        int64_t numel = 1;
        for (int d = 0; d < ndim; d++) numel *= sh[d];
        if (numel != parts[i].rows) {
            free(v);
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "tensor '%s' has %lld elements; expected %d",
                             parts[i].name, (long long)numel, parts[i].rows);
        }
        memcpy(v + o, p, (size_t)parts[i].rows * 4);
        o += parts[i].rows;
    }
    *out = v;
    return KILN_OK;
}

static kiln_status table(kiln_ctx *ctx, infer_src_fn src, void *ud,
                         const char *name, int rows, int cols, float **out)
{
    kiln_status st = KILN_OK;
    int ndim;
    int64_t sh[4] = {0};
    *out = NULL;
    const float *p = get(ctx, src, ud, name, &ndim, sh, true, &st);
    if (!p) return st;
    if (ndim != 2 || sh[0] < rows || sh[1] != cols)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "tensor '%s' has shape (%lld, %lld); expected (%d, %d)",
                         name, (long long)sh[0], (long long)sh[1], rows, cols);
    *out = kiln_aligned_alloc(ctx, (size_t)rows * cols * 4 + 64);
    if (!*out) return KILN_ERR_NOMEM;
    memcpy(*out, p, (size_t)rows * cols * 4);
    return KILN_OK;
}

static void imat_free(imat *m)
{
    free(m->f32);
    free(m->bf16);
    m->f32 = NULL;
    m->bf16 = NULL;
}

void kiln_engine_free(kiln_engine *e)
{
    if (!e) return;
    if (e->layers)
        for (int l = 0; l < e->L; l++) {
            ilayer *y = &e->layers[l];
            free(y->ln1_w); free(y->ln1_b); free(y->ln2_w); free(y->ln2_b);
            imat_free(&y->qkv); free(y->qkv_b);
            imat_free(&y->o); free(y->o_b);
            imat_free(&y->up); free(y->up_b);
            imat_free(&y->down); free(y->down_b);
        }
    free(e->layers);
    if (e->head_is_wte) e->head.f32 = NULL;
    imat_free(&e->head);
    free(e->wte); free(e->wpe); free(e->lnf_w); free(e->lnf_b);
    free(e->rope_cos); free(e->rope_sin);
    free(e->kc); free(e->vc); free(e->pos);
    free(e->x); free(e->xn); free(e->qkv); free(e->att); free(e->hid);
    free(e->ff); free(e->scores); free(e->epos); free(e->wrow);
    free(e->slot_next);
    kern_gemm_free(e->gemm);
    free(e);
}

static kiln_status build_gpt2(kiln_ctx *ctx, kiln_engine *e, infer_src_fn src, void *ud)
{
    const int C = e->C, F = e->F;
    char n1[160], n2[160], n3[160];
    kiln_status st;
    /* Orientation: HF GPT-2 stores Conv1D weights (in, out); a model that
     * stores (out, in) shows it on the non-square c_attn. */
    int ndim;
    int64_t sh[4] = {0};
    bool conv1d = true;
    if (src(ud, "transformer.h.0.attn.c_attn.weight", &ndim, sh) && ndim == 2 &&
        sh[0] == 3 * C && sh[1] == C)
        conv1d = false;
    for (int l = 0; l < e->L; l++) {
        ilayer *y = &e->layers[l];
#define NM(buf, s) (snprintf(buf, sizeof buf, "transformer.h.%d.%s", l, s), buf)
        if ((st = vec(ctx, src, ud, &y->ln1_w, &(part){NM(n1, "ln_1.weight"), C}, 1, true))) return st;
        if ((st = vec(ctx, src, ud, &y->ln1_b, &(part){NM(n1, "ln_1.bias"), C}, 1, true))) return st;
        if ((st = vec(ctx, src, ud, &y->ln2_w, &(part){NM(n1, "ln_2.weight"), C}, 1, true))) return st;
        if ((st = vec(ctx, src, ud, &y->ln2_b, &(part){NM(n1, "ln_2.bias"), C}, 1, true))) return st;
        if ((st = pack(ctx, e, src, ud, &y->qkv, &(part){NM(n1, "attn.c_attn.weight"), 3 * C}, 1, C, conv1d))) return st;
        if ((st = vec(ctx, src, ud, &y->qkv_b, &(part){NM(n1, "attn.c_attn.bias"), 3 * C}, 1, false))) return st;
        if ((st = pack(ctx, e, src, ud, &y->o, &(part){NM(n1, "attn.c_proj.weight"), C}, 1, C, conv1d))) return st;
        if ((st = vec(ctx, src, ud, &y->o_b, &(part){NM(n1, "attn.c_proj.bias"), C}, 1, false))) return st;
        if ((st = pack(ctx, e, src, ud, &y->up, &(part){NM(n1, "mlp.c_fc.weight"), F}, 1, C, conv1d))) return st;
        if ((st = vec(ctx, src, ud, &y->up_b, &(part){NM(n1, "mlp.c_fc.bias"), F}, 1, false))) return st;
        if ((st = pack(ctx, e, src, ud, &y->down, &(part){NM(n1, "mlp.c_proj.weight"), C}, 1, F, conv1d))) return st;
        if ((st = vec(ctx, src, ud, &y->down_b, &(part){NM(n1, "mlp.c_proj.bias"), C}, 1, false))) return st;
#undef NM
    }
    (void)n2; (void)n3;
    if ((st = table(ctx, src, ud, "transformer.wpe.weight", e->NCTX, C, &e->wpe))) return st;
    if ((st = vec(ctx, src, ud, &e->lnf_w, &(part){"transformer.ln_f.weight", C}, 1, true))) return st;
    if ((st = vec(ctx, src, ud, &e->lnf_b, &(part){"transformer.ln_f.bias", C}, 1, true))) return st;
    return table(ctx, src, ud, "transformer.wte.weight", e->V, C, &e->wte);
}

static kiln_status build_llama(kiln_ctx *ctx, kiln_engine *e, infer_src_fn src, void *ud)
{
    const int C = e->C, F = e->F, KVD = e->KVD;
    char a[160], b[160], c[160];
    kiln_status st;
    for (int l = 0; l < e->L; l++) {
        ilayer *y = &e->layers[l];
#define NM(buf, s) (snprintf(buf, sizeof buf, "model.layers.%d.%s", l, s), buf)
        if ((st = vec(ctx, src, ud, &y->ln1_w, &(part){NM(a, "input_layernorm.weight"), C}, 1, true))) return st;
        if ((st = vec(ctx, src, ud, &y->ln2_w, &(part){NM(a, "post_attention_layernorm.weight"), C}, 1, true))) return st;
        part qkv[3] = {{NM(a, "self_attn.q_proj.weight"), C},
                       {NM(b, "self_attn.k_proj.weight"), KVD},
                       {NM(c, "self_attn.v_proj.weight"), KVD}};
        if ((st = pack(ctx, e, src, ud, &y->qkv, qkv, 3, C, false))) return st;
        part qkvb[3] = {{NM(a, "self_attn.q_proj.bias"), C},
                        {NM(b, "self_attn.k_proj.bias"), KVD},
                        {NM(c, "self_attn.v_proj.bias"), KVD}};
        if ((st = vec(ctx, src, ud, &y->qkv_b, qkvb, 3, false))) return st;
        if ((st = pack(ctx, e, src, ud, &y->o, &(part){NM(a, "self_attn.o_proj.weight"), C}, 1, C, false))) return st;
        if ((st = vec(ctx, src, ud, &y->o_b, &(part){NM(a, "self_attn.o_proj.bias"), C}, 1, false))) return st;
        part gu[2] = {{NM(a, "mlp.gate_proj.weight"), F}, {NM(b, "mlp.up_proj.weight"), F}};
        if ((st = pack(ctx, e, src, ud, &y->up, gu, 2, C, false))) return st;
        if ((st = pack(ctx, e, src, ud, &y->down, &(part){NM(a, "mlp.down_proj.weight"), C}, 1, F, false))) return st;
#undef NM
    }
    if ((st = vec(ctx, src, ud, &e->lnf_w, &(part){"model.norm.weight", C}, 1, true))) return st;
    return table(ctx, src, ud, "model.embed_tokens.weight", e->V, C, &e->wte);
}

kiln_status infer_engine_new_src(kiln_ctx *ctx, const kiln_config *cfg,
                                 infer_src_fn src, void *ud,
                                 const kiln_engine_opts *opts,
                                 kiln_engine **out)
{
    *out = NULL;
    kiln_status st;
    if (cfg->n_layer < 1 || cfg->n_embd < 1 || cfg->n_head < 1 ||
        cfg->n_embd % cfg->n_head || cfg->vocab_size < 1 || cfg->n_ctx < 1 ||
        cfg->n_inner < 1 ||
        (cfg->arch == KILN_ARCH_LLAMA &&
         (cfg->n_kv_head < 1 || cfg->n_head % cfg->n_kv_head ||
          (cfg->n_embd / cfg->n_head) % 2)))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "engine: inconsistent model config (n_layer %d, n_embd %d, "
                         "n_head %d, n_kv_head %d, n_inner %d, vocab %d, n_ctx %d)",
                         cfg->n_layer, cfg->n_embd, cfg->n_head, cfg->n_kv_head,
                         cfg->n_inner, cfg->vocab_size, cfg->n_ctx);
    kiln_engine_opts o = opts ? *opts : kiln_engine_opts_default();
    if (o.n_slots < 1 || o.n_slots > 4096)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "engine: n_slots %d out of range (1..4096)", o.n_slots);
    if (o.n_ctx <= 0 || o.n_ctx > cfg->n_ctx) {
        if (o.n_ctx > cfg->n_ctx)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "engine: context %d exceeds the model's n_ctx %d "
                             "(use --ctx %d or less)",
                             o.n_ctx, cfg->n_ctx, cfg->n_ctx);
        o.n_ctx = cfg->n_ctx;
    }
    if (o.chunk < 1) o.chunk = 64;
    if (o.chunk < o.n_slots) o.chunk = o.n_slots;
    if (o.wtype != KILN_DTYPE_F32 && o.wtype != KILN_DTYPE_BF16)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_engine_opts.wtype = %d (%s): the engine stores weights as "
                         "KILN_DTYPE_F32 or KILN_DTYPE_BF16",
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
    e->C = cfg->n_embd;
    e->NH = cfg->n_head;
    e->KVH = cfg->n_kv_head > 0 ? cfg->n_kv_head : cfg->n_head;
    e->HS = e->C / e->NH;
    e->KVD = e->KVH * e->HS;
    e->F = cfg->n_inner;
    e->V = cfg->vocab_size;
    e->L = cfg->n_layer;
    e->S = o.n_slots;
    e->NCTX = o.n_ctx;
    const bool llama = cfg->arch == KILN_ARCH_LLAMA;
    if (!llama) e->KVD = e->C, e->KVH = e->NH;
    e->layers = kiln_calloc(ctx, (size_t)e->L, sizeof(ilayer));
    if (!e->layers) { kiln_engine_free(e); return KILN_ERR_NOMEM; }

    st = llama ? build_llama(ctx, e, src, ud) : build_gpt2(ctx, e, src, ud);
    if (st) { kiln_engine_free(e); return st; }

    /* LM head: tied to the embedding unless lm_head.weight exists. */
    int ndim;
    int64_t sh[4] = {0};
    if (!cfg->tie_embeddings && src(ud, "lm_head.weight", &ndim, sh)) {
        st = pack(ctx, e, src, ud, &e->head, &(part){"lm_head.weight", e->V}, 1,
                  e->C, false);
        if (st) { kiln_engine_free(e); return st; }
    } else if (o.wtype == KILN_DTYPE_F32) {
        e->head = (imat){.rows = e->V, .cols = e->C, .f32 = e->wte};
        e->head_is_wte = true;
        e->weight_bytes += (size_t)e->V * e->C * 4;
    } else {
        e->head = (imat){.rows = e->V, .cols = e->C};
        e->head.bf16 = kiln_aligned_alloc(ctx, (size_t)e->V * e->C * 2 + 64);
        if (!e->head.bf16) { kiln_engine_free(e); return KILN_ERR_NOMEM; }
        for (size_t i = 0; i < (size_t)e->V * e->C; i++)
            e->head.bf16[i] = f32_to_bf16(e->wte[i]);
        e->weight_bytes += (size_t)e->V * e->C * 2;
    }

    if (llama) {
        int h2 = e->HS / 2;
        e->rope_cos = kiln_aligned_alloc(ctx, (size_t)e->NCTX * h2 * 4 + 64);
        e->rope_sin = kiln_aligned_alloc(ctx, (size_t)e->NCTX * h2 * 4 + 64);
        if (!e->rope_cos || !e->rope_sin) { kiln_engine_free(e); return KILN_ERR_NOMEM; }
        for (int p = 0; p < e->NCTX; p++)
            for (int i = 0; i < h2; i++) {
                double f = pow((double)cfg->rope_theta, -2.0 * i / e->HS);
                e->rope_cos[(size_t)p * h2 + i] = (float)cos(p * f);
                e->rope_sin[(size_t)p * h2 + i] = (float)sin(p * f);
            }
    }

    if (o.wtype == KILN_DTYPE_F32) e->gemm = kern_gemm_fast_new();
    size_t kvn = (size_t)e->L * e->S * e->NCTX * e->KVD;
    const int T = o.chunk;
    const int QKV = e->C + 2 * e->KVD;
    e->kc = kiln_aligned_alloc(ctx, kvn * 4 + 64);
    e->vc = kiln_aligned_alloc(ctx, kvn * 4 + 64);
    e->pos = kiln_calloc(ctx, (size_t)e->S, sizeof(int));
    e->slot_next = kiln_calloc(ctx, (size_t)e->S, sizeof(int));
    e->x = kiln_aligned_alloc(ctx, (size_t)T * e->C * 4 + 64);
    e->xn = kiln_aligned_alloc(ctx, (size_t)T * e->C * 4 + 64);
    e->qkv = kiln_aligned_alloc(ctx, (size_t)T * QKV * 4 + 64);
    e->att = kiln_aligned_alloc(ctx, (size_t)T * e->C * 4 + 64);
    e->hid = kiln_aligned_alloc(ctx, (size_t)T * 2 * e->F * 4 + 64);
    e->ff = kiln_aligned_alloc(ctx, (size_t)T * e->F * 4 + 64);
    e->scores = kiln_aligned_alloc(ctx, (size_t)T * e->NH * e->NCTX * 4 + 64);
    e->epos = kiln_calloc(ctx, (size_t)T, sizeof(int));
    e->wrow = kiln_calloc(ctx, (size_t)T, sizeof(int));
    if (!e->kc || !e->vc || !e->pos || !e->slot_next || !e->x || !e->xn ||
        !e->qkv || !e->att || !e->hid || !e->ff || !e->scores || !e->epos ||
        !e->wrow) {
        kiln_engine_free(e);
        return kiln_fail(ctx, KILN_ERR_NOMEM,
                         "engine: out of memory for the KV cache (%d slots x %d "
                         "positions); lower --parallel or --ctx",
                         e->S, e->NCTX);
    }
    *out = e;
    return KILN_OK;
}

const kiln_config *kiln_engine_config(const kiln_engine *e) { return &e->cfg; }
int kiln_engine_n_slots(const kiln_engine *e) { return e->S; }
int kiln_engine_n_ctx(const kiln_engine *e) { return e->NCTX; }
size_t kiln_engine_weight_bytes(const kiln_engine *e) { return e->weight_bytes; }

void kiln_engine_reset(kiln_engine *e, int slot)
{
    if (slot >= 0 && slot < e->S) e->pos[slot] = 0;
}

int kiln_engine_pos(const kiln_engine *e, int slot)
{
    return (slot >= 0 && slot < e->S) ? e->pos[slot] : -1;
}

/* ---- forward ------------------------------------------------------- */

/* Y (T, rows) (+)= X W^T + b. Decode-sized T streams W through ik_linear;
 * prefill chunks of fp32 weights go through the library's GEMM. */
static void linear(const kiln_engine *e, float *Y, const float *X, int T,
                   const imat *W, const float *b, bool acc)
{
    if (T < 16 || !W->f32 || !e->gemm) {
        ik_linear(Y, X, T, W, b, acc, e->nth);
        return;
    }
    e->gemm->gemm(e->gemm, false, true, T, W->rows, W->cols, 1.0f, X, W->cols, W->f32,
                  W->cols, acc ? 1.0f : 0.0f, Y, W->rows);
    if (b)
        for (int t = 0; t < T; t++) {
            float *y = Y + (size_t)t * W->rows;
            for (int r = 0; r < W->rows; r++) y[r] += b[r];
        }
}

static void layernorm(float *out, const float *x, const float *w,
                      const float *b, int C, float eps)
{
    double m = 0, v = 0;
    for (int i = 0; i < C; i++) m += x[i];
    m /= C;
    for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
    v /= C;
    float r = (float)(1.0 / sqrt(v + eps));
    for (int i = 0; i < C; i++) out[i] = ((float)(x[i] - m)) * r * w[i] + (b ? b[i] : 0.0f);
}

static void rmsnorm(float *out, const float *x, const float *w, int C, float eps)
{
    double ss = 0;
    for (int i = 0; i < C; i++) ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / C + eps));
    for (int i = 0; i < C; i++) out[i] = x[i] * r * w[i];
}

static void norm_rows(const kiln_engine *e, float *out, const float *x, int T,
                      const float *w, const float *b)
{
    for (int t = 0; t < T; t++) {
        if (e->cfg.arch == KILN_ARCH_LLAMA)
            rmsnorm(out + (size_t)t * e->C, x + (size_t)t * e->C, w, e->C, e->cfg.norm_eps);
        else
            layernorm(out + (size_t)t * e->C, x + (size_t)t * e->C, w, b, e->C, e->cfg.norm_eps);
    }
}

static void rope(const kiln_engine *e, float *v, int p)
{
    int h2 = e->HS / 2;
    const float *cs = e->rope_cos + (size_t)p * h2, *sn = e->rope_sin + (size_t)p * h2;
    for (int i = 0; i < h2; i++) {
        float a = v[i], b = v[i + h2];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h2] = b * cs[i] + a * sn[i];
    }
}

static inline float gelu_tanh(float x)
{
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
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
        e->epos[t] = e->slot_next[s]++;
        if (toks[t].want_logits) e->wrow[nw++] = t;
    }
    const int C = e->C, HS = e->HS, KVD = e->KVD, NH = e->NH, F = e->F;
    const int QKV = C + 2 * KVD, grp = NH / e->KVH;
    const bool llama = e->cfg.arch == KILN_ARCH_LLAMA;
    const float scale = 1.0f / sqrtf((float)HS);

    for (int t = 0; t < T; t++) {
        float *x = e->x + (size_t)t * C;
        memcpy(x, e->wte + (size_t)toks[t].token * C, (size_t)C * 4);
        if (!llama) {
            const float *pe = e->wpe + (size_t)e->epos[t] * C;
            for (int i = 0; i < C; i++) x[i] += pe[i];
        }
    }
    for (int l = 0; l < e->L; l++) {
        const ilayer *y = &e->layers[l];
        norm_rows(e, e->xn, e->x, T, y->ln1_w, y->ln1_b);
        linear(e, e->qkv, e->xn, T, &y->qkv, y->qkv_b, false);
        for (int t = 0; t < T; t++) {
            float *q = e->qkv + (size_t)t * QKV, *k = q + C, *v = k + KVD;
            if (llama) {
                for (int h = 0; h < NH; h++) rope(e, q + h * HS, e->epos[t]);
                for (int h = 0; h < e->KVH; h++) rope(e, k + h * HS, e->epos[t]);
            }
            size_t co = (((size_t)l * e->S + toks[t].slot) * e->NCTX + e->epos[t]) * KVD;
            memcpy(e->kc + co, k, (size_t)KVD * 4);
            memcpy(e->vc + co, v, (size_t)KVD * 4);
        }
        long work = 0; /* multiply-adds of attention in this step */
        for (int t = 0; t < T; t++) work += (long)(e->epos[t] + 1) * 2 * C;
#pragma omp parallel for schedule(dynamic, 1) num_threads(e->nth) if (e->nth > 1 && T * NH > 1 && work > 200000)
        for (int th = 0; th < T * NH; th++) {
            int t = th / NH, h = th % NH, kh = h / grp, n = e->epos[t] + 1;
            const float *q = e->qkv + (size_t)t * QKV + h * HS;
            const size_t base = ((size_t)l * e->S + toks[t].slot) * e->NCTX * KVD + (size_t)kh * HS;
            float *sc = e->scores + (size_t)th * e->NCTX;
            float mx = -INFINITY;
            for (int j = 0; j < n; j++) {
                const float *k = e->kc + base + (size_t)j * KVD;
                float s = 0;
#pragma omp simd reduction(+ : s)
                for (int i = 0; i < HS; i++) s += q[i] * k[i];
                sc[j] = s * scale;
                if (sc[j] > mx) mx = sc[j];
            }
            float sum = 0;
            for (int j = 0; j < n; j++) {
                sc[j] = expf(sc[j] - mx);
                sum += sc[j];
            }
            float inv = 1.0f / sum;
            float *o = e->att + (size_t)t * C + h * HS;
            for (int i = 0; i < HS; i++) o[i] = 0;
            for (int j = 0; j < n; j++) {
                const float *v = e->vc + base + (size_t)j * KVD;
                float a = sc[j] * inv;
#pragma omp simd
                for (int i = 0; i < HS; i++) o[i] += a * v[i];
            }
        }
        linear(e, e->x, e->att, T, &y->o, y->o_b, true);
        norm_rows(e, e->xn, e->x, T, y->ln2_w, y->ln2_b);
        if (llama) {
            linear(e, e->hid, e->xn, T, &y->up, y->up_b, false);
            for (int t = 0; t < T; t++) {
                const float *g = e->hid + (size_t)t * 2 * F, *u = g + F;
                float *f = e->ff + (size_t)t * F;
                for (int i = 0; i < F; i++) f[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
            }
        } else {
            linear(e, e->ff, e->xn, T, &y->up, y->up_b, false);
            for (size_t i = 0; i < (size_t)T * F; i++) e->ff[i] = gelu_tanh(e->ff[i]);
        }
        linear(e, e->x, e->ff, T, &y->down, y->down_b, true);
    }
    if (nw > 0) {
        /* Final norm of the rows whose logits are wanted, compacted. */
        for (int i = 0; i < nw; i++) {
            const float *x = e->x + (size_t)e->wrow[i] * C;
            float *o = e->xn + (size_t)i * C;
            if (llama) rmsnorm(o, x, e->lnf_w, C, e->cfg.norm_eps);
            else layernorm(o, x, e->lnf_w, e->lnf_b, C, e->cfg.norm_eps);
        }
        linear(e, logits, e->xn, nw, &e->head, NULL, false);
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
