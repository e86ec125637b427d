/*
 * model.h — the transformer's internals (model layer, private): parameter
 * views, activations and the kiln_model struct, for the layers that work on
 * the weights directly (the KV-cache decode path in infer/serve, mixed
 * precision, LoRA, quantization).
 *
 * Shapes use B, T, C, V, L, NH, KVH, HS, F (kiln.h) and
 *   QKV = (NH + 2*KVH) * HS   (= 3C without GQA)
 * Parameters live in one contiguous block (kiln_model_params), in this
 * order, which is also the order of kiln_model_tensor(i):
 *   embeddings (wte, wpe) | layer 0 | ... | layer L-1 | final norm, lm_head
 * so "layer l" and "the head" are contiguous ranges (model->layer_off).
 * Gradients mirror the block exactly.
 *
 * Weight layouts are those of the HF files, so the block can be written
 * out unchanged:
 *   gpt2  Conv1D weights are (in, out): c_attn (C, 3C), c_proj (C, C),
 *         c_fc (C, F), mlp.c_proj (F, C)          -> KERN_W_IN_OUT
 *   llama nn.Linear weights are (out, in): q_proj (NH*HS, C), k_proj and
 *         v_proj (KVH*HS, C) stored back to back = one (QKV, C) matrix;
 *         gate_proj and up_proj (F, C) back to back = one (2F, C) matrix;
 *         o_proj (C, NH*HS), down_proj (C, F)      -> KERN_W_OUT_IN
 */
#ifndef KILN_MODEL_H
#define KILN_MODEL_H

#include "base/base.h"
#include "io/gguf.h"
#include "kernels/kernels.h"

#include <time.h>

/* Views of one layer's tensors (into params or grads). NULL when the
 * architecture has no such tensor. */
typedef struct model_layer {
    float *ln1_w;    /* (C)  ln_1 / input_layernorm */
    float *ln1_b;    /* (C)  gpt2 only */
    float *qkv_w;    /* gpt2 (C, 3C) c_attn; llama (QKV, C) q|k|v_proj */
    float *qkv_b;    /* gpt2 (3C); llama (QKV) when bias or qkv_bias */
    float *proj_w;   /* gpt2 (C, C) attn.c_proj (in,out); llama (C, C) o_proj */
    float *proj_b;   /* (C) gpt2, llama when bias (not qkv_bias: qwen2) */
    float *ln2_w;    /* (C)  ln_2 / post_attention_layernorm */
    float *ln2_b;    /* (C)  gpt2 only */
    float *fc_w;     /* gpt2 (C, F) c_fc; llama (2F, C) gate_proj|up_proj */
    float *fc_b;     /* gpt2 (F) */
    float *fcproj_w; /* gpt2 (F, C) mlp.c_proj; llama (C, F) down_proj */
    float *fcproj_b; /* gpt2 (C) */
    float *lora_a[KILN_LORA_MAX_SLOTS]; /* (r, in) per slot (lora.c), NULL */
    float *lora_b[KILN_LORA_MAX_SLOTS]; /* (out, r) where not targeted */
} model_layer;

typedef struct model_weights {
    float *wte;          /* (V, C) wte / embed_tokens */
    float *wpe;          /* (n_ctx, C) gpt2 only */
    model_layer *layers; /* (L) */
    float *lnf_w;        /* (C) ln_f / model.norm */
    float *lnf_b;        /* (C) gpt2 only */
    float *lm_head;      /* (V, C); == wte when tied */
} model_weights;

/* Activations of the last forward pass, carved from the arena for (B, T).
 * N = B*T. Per-layer tensors are (L, ...) blocks; layer l's slice starts at
 * l * (its per-layer size). */
typedef struct model_acts {
    /* The one pass (pass.c) for every precision: the inputs of
     * products are kern_act in the pass backend's dtype and layout
     * (model_pass_backend: fp32 rows, or bf16 in the cpu backend's packed
     * layout); the residual stream, norm statistics and logits are fp32. */
    int32_t *tokens;  /* (B, T) copy of the inputs */
    float *encoded;   /* (N, C) embeddings (+ positions) */
    void *ln1p;       /* (L, kern_act (N, C)) normalized inputs of qkv */
    float *ln1_mean;  /* (L, N) gpt2 */
    float *ln1_rstd;  /* (L, N) */
    void *qkvh;       /* (L, N, QKV) rows in the compute dtype, after RoPE */
    float *lse;       /* (L, B, NH, T) log-sum-exp of each attention row's
                         scaled scores (flash attention: no (T, T) matrix) */
    void *attyp;      /* (L, kern_act (N, C)) attention output */
    float *res2;      /* (L, N, C) residual after attention */
    void *ln2p;       /* (L, kern_act (N, C)) */
    float *ln2_mean;  /* (L, N) gpt2 */
    float *ln2_rstd;  /* (L, N) */
    void *fchp;       /* (L, kern_act (N, FH)) gpt2 pre-GELU; llama gate|up */
    float *res3;      /* (L, N, C) layer output */
    void *lnfp;       /* kern_act (N, C) the final norm's output */
    float *lnf_mean;  /* (N) */
    float *lnf_rstd;  /* (N) */
    float *logits;    /* (N, V) */
    void *actp;       /* one layer's act(fch), a kern_act (N, F) */
    float *tmp;       /* (N, max(C, FH, QKV)) one layer's fp32 scratch */
    float *atty;      /* (N, C) one layer's fp32 attention output (bf16
                         values when the backend has no bf16 attention) */
    /* backward scratch */
    float *dres;      /* (N, C) gradient of the residual stream */
    float *dc;        /* (N, C) */
    float *df;        /* (N, F) */
    float *dbig;      /* (N, max(QKV, 2F)) */
    /* packed rows (kiln_model_forward_pos) */
    int32_t *pos;     /* (B, T) position of each token inside its document */
    float *lse_doc;   /* (NH, T) scratch of the document-masked attention */
    float *lora_x, *lora_h; /* the adapters' scratch (lora.c; NULL-sized without) */
    kern_act *lora_hp;      /* the backward's recomputed fchp (one layer) */
} model_acts;

/* Per-op time accounting (bench/bench_train prints it). */
enum {
    MODEL_PROF_MATMUL_FWD,
    MODEL_PROF_MATMUL_BWD,
    MODEL_PROF_ATTN_FWD,
    MODEL_PROF_ATTN_BWD,
    MODEL_PROF_NORM,
    MODEL_PROF_ACT,
    MODEL_PROF_OTHER,
    MODEL_PROF_N
};
extern const char *const model_prof_names[MODEL_PROF_N];

/* matrices.c */
struct model_upd;
void model_upd_free(kiln_model *m);
/* The weight matrices whose packed bf16 copies an optimizer step can
 * refresh strip by strip while the updated rows are in cache (a bf16
 * model on AVX512_BF16/AMX). The optimizer (train/: kiln_model_adamw_step)
 * updates each listed matrix in strips of `strip` rows, calls after(ud,
 * W, r0) on each strip, and then model_wstrip_fresh(m, i) for each matrix
 * it did so; the next forward then skips repacking it. */
typedef struct model_wstrip {
    size_t offset;  /* in floats, into the parameter block */
    int rows, cols; /* row-major, as stored */
    int strip;      /* rows per strip */
    void (*after)(void *ud, const float *W, int r0);
    void *ud;
} model_wstrip;
/* This step's list (sorted by offset) in *out; returns its length, 0 when
 * there is nothing to refresh (not bf16, no packed copies, out of memory).
 * Valid until the next call. */
int model_wstrips(kiln_model *m, const model_wstrip **out);
/* Marks matrix i of the last model_wstrips list current. */
void model_wstrip_fresh(kiln_model *m, int i);
/* kiln_model_zero_grad of the bf16-activation path: the weight matrices'
 * gradients only marked zero (grads_lazy); and the zeros written out, for
 * whatever reads or accumulates onto them other than that backward. */
void model_grads_zero(kiln_model *m);
void model_grads_materialize(kiln_model *m);
/* The gradient block as it is, lazily zeroed matrices not written out: for
 * a reader of only the ranges the gradient hook reports final during the
 * next backward (the trainer's overlapped allreduce), which that backward
 * has written whole by then. */
float *model_grads_deferred(kiln_model *m);
/* The parameters are about to be written by other means than
 * kiln_model_adamw_step: packed copies marked fresh by it are stale, and
 * the next forward re-derives every packed copy. */
void model_params_touched(kiln_model *m);
/* model_params_touched, then the block for writing: the library's own
 * writers (the trainer's broadcast of rank 0's weights, ZeRO's update). */
float *model_params_write(kiln_model *m);
/* kiln_model_adamw_step has written the trainable parameters and marked
 * the packed copies it refreshed (and those of frozen matrices, still
 * current) fresh for the next forward: that forward starts a new epoch. */
void model_params_stepped(kiln_model *m);
/* Frozen weight matrices whose packed copies are current now stay so for
 * the next forward, when untouched(ud, offset, numel) confirms that the
 * step did not write them (the optimizer's own word: it may have been
 * made before a tensor was frozen). matrices.c. */
void model_wkeep_frozen(kiln_model *m, bool (*untouched)(void *, size_t, size_t), void *ud);

/* ---- trainable / frozen (model.c) ---------------------------------------
 * The gradient views the backward writes: m->g, or with frozen tensors
 * m->gf, where a view whose whole matrix (a fused one: llama q|k|v,
 * gate|up) is frozen is NULL, so no kernel computes its gradient. */
model_weights *model_grad_views(kiln_model *m);
/* Frozen tensors inside a fused matrix that has trainable parts get a
 * gradient computed with it: the backward calls this on each range it
 * finishes (before the gradient hook), which zeroes them there, so a
 * frozen tensor's gradient always reads as zeros. */
void model_grad_fixup(kiln_model *m, size_t begin, size_t end);
/* Whether every tensor overlapping [off, off+len) is frozen. */
bool model_range_frozen(const kiln_model *m, size_t off, size_t len);

struct kiln_model {
    kiln_config cfg;
    int L, C, NH, KVH, HS, QKV, F, V;
    size_t num_params;
    float *params; /* (num_params) 64-byte aligned */
    float *grads;  /* (num_params) after prepare, else NULL */
    model_weights w; /* views into params */
    model_weights g; /* views into grads (valid after prepare) */
    kiln_tensor_info *tensors;
    int n_tensors;
    size_t *layer_off; /* (L + 2): layer l is [layer_off[l], layer_off[l+1]);
                          layer_off[L+1] = num_params (the head ends there) */
    float *rope_cos;   /* (n_ctx, HS/2) llama */
    float *rope_sin;   /* (n_ctx, HS/2) */
    float *rope_nsin;  /* (n_ctx, HS/2) -rope_sin: the inverse rotation of
                          rope_at (the backward of packed rows) */
    const kern_ops *ops;
    kern_gemm *gemm;
    kern_backend *be; /* the bf16/fp16 backend (precision.c), NULL in fp32;
                         it owns ops and gemm then */
    kern_backend *fb; /* the f32 backend over ops and gemm: the pass's ops
                         unless bf16 activations (model_pass_backend) */
    kiln_bf16_kernel bf16_kernel; /* kiln_precision_opts.bf16_kernel (asked) */
    bool bf16_f32_acts;  /* !kiln_precision_opts.bf16_acts (zero = default) */
    arena act;
    int B_cap, T_cap;  /* what the arena is sized for */
    bool act_mp;       /* ... and whether for bf16 activations */
    int B, T;          /* shape of the last forward (0 = none) */
    bool gguf_llama_qk; /* read from a "llama" GGUF with q/k/v biases and no
                           o bias: its q/k rows are in llama's permuted
                           order (model_gguf_arch: "llama", not "qwen2") */
    bool packed;       /* the last forward had positions (a.pos): attention
                          kept inside each document, positions per document */
    model_acts a;
    int threads;       /* 0 = OpenMP default */
    int profile;       /* 1: per-op wall seconds into prof[]; 2: CPU seconds */
    double prof[MODEL_PROF_N];
    kiln_grad_ready_fn hook;
    void *hook_ud;
    struct model_upd *upd; /* kiln_model_adamw_step's matrix list (matrices.c) */
    bool grads_lazy;       /* the weight matrices' gradients are zero but not
                              written: the next bf16 backward stores them */
    bool weights_changed;  /* the parameters were written since the last
                              forward: it re-derives the packed copies */
    bool params_shared;    /* kiln_model_params_mut was called: the caller
                              may write at any time, every forward
                              re-derives them */
    bool any_frozen;       /* some tensor has trainable = false */
    model_weights gf;      /* gradient views, NULL where frozen (after
                              prepare; model_grad_views) */
    int *fixup;            /* tensors zeroed after the backward of a
                              fused matrix they are part of (model_grad_fixup) */
    int n_fixup;
    bool lora_train;       /* dropout on (kiln_model_lora_train) */
    uint64_t lora_seed;    /* kiln_lora_opts.seed */
    uint64_t lora_step;    /* forwards while on: the dropout masks' step */
    uint64_t lora_mask;    /* the masks' seed of the last forward */
};

/* Profiling clock: wall time (m->profile == 1) or process CPU time
 * (profile == 2, robust to other processes on a shared machine). */
static inline double model_prof_now(const kiln_model *m)
{
    if (m->profile == 2) {
        struct timespec ts;
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    return kiln_time_now();
}

/* Runs stmt, adding its time to m->prof[MODEL_PROF_id] when profiling. */
#define MODEL_P(id, stmt)                                                   \
    do {                                                                    \
        double t0_ = m->profile ? model_prof_now(m) : 0;                    \
        stmt;                                                               \
        if (m->profile) m->prof[MODEL_PROF_##id] += model_prof_now(m) - t0_; \
    } while (0)

/* The architecture's norm backward (LayerNorm with bias for gpt2, RMSNorm
 * for llama; mean and db unused by the latter): dinp, dw, db accumulate. */
static inline void model_norm_bwd(const kiln_model *m, float *dinp, float *dw, float *db,
                                  const float *dout, const float *inp, const float *w,
                                  const float *mean, const float *rstd, int n)
{
    if (m->cfg.arch == KILN_ARCH_GPT2)
        m->ops->layernorm_bwd(dinp, dw, db, dout, inp, w, mean, rstd, n, m->C);
    else
        m->ops->rmsnorm_bwd(dinp, dw, dout, inp, w, rstd, n, m->C);
}

/* ---- one layer's forward (block.c), shared with the engine ------------ */

/* The sizes a layer needs (QKV = (NH + 2*KVH) * HS). */
typedef struct model_shape {
    kiln_arch arch;
    int C, F, QKV, NH, KVH, HS;
    float eps;
} model_shape;

/* One layer's tensors as typed views: the four matrices (kernels.h
 * kern_wt), vectors fp32 (NULL where the architecture has none). */
typedef struct model_blk_src {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    kern_wt qkv, proj, fc, fcproj;
    const float *qkv_b, *proj_b, *fc_b, *fcproj_b;
} model_blk_src;

/* One layer's weights as the block reads them: the matrices as handles of
 * the run's backend (weight_prepare; on the f32 backend kern_f32_weight of
 * any typed weight), vectors fp32. */
typedef struct model_blk_w {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    kern_weight *qkv, *proj, *fc, *fcproj;
    const float *qkv_b, *proj_b, *fc_b, *fcproj_b;
    const float *lora_a[KILN_LORA_MAX_SLOTS], *lora_b[KILN_LORA_MAX_SLOTS]; /* fp32, NULL */
} model_blk_w;

/* One layer's buffers for n rows (block.c says what each holds). Inputs
 * of products are kern_act of the run's backend: ln1p, attyp, ln2p (n, C),
 * fchp (n, FH), actp (n, F); fp32: inp, res2, res3 (n, C; res3 may alias
 * inp), qkv (n, QKV), tmp (n, FH), ln*_mean (n, gpt2), ln*_rstd (n);
 * qkvh (n, QKV) rows of the compute dtype (for the attention callback;
 * the product goes there when model_run.qkv_rows). */
typedef struct model_blk {
    const float *inp;
    kern_act *ln1p, *attyp, *ln2p, *fchp, *actp;
    float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd;
    float *qkv, *tmp, *res2, *res3;
    void *qkvh;
} model_blk;

/* How a block runs: the backend (its activation ops), the sizes, and the
 * attention of layer l (rope included) from io->qkv (rotated in place) or
 * io->qkvh into io->attyp: training's flash attention over the batch, or
 * the engine's against its KV cache. qkv_rows: the qkv product is stored
 * straight into io->qkvh (no rope, and the attention reads rows). prof:
 * the model whose per-op clock the block adds to (NULL: none). */
/* ---- LoRA (lora.c) --------------------------------------------------- */

/* Where slot s sits: the product lin (0 qkv, 1 proj, 2 fc, 3 fcproj) and
 * the columns [off, off + out) of its output, input width in. */
typedef struct model_lora_slot {
    int lin, off, out, in;
} model_lora_slot;
model_lora_slot model_lora_slot_of(const kiln_config *c, int s);

/* A run's adapters: scale alpha/r, dropout p (0: none) with the masks of
 * seed, and fp32 scratch (xu, xs: n max(C, F); hs: 2 n r). */
typedef struct model_lora {
    const kiln_config *cfg;
    int rank;
    float scale, p;
    uint64_t seed;
    float *xu, *xs, *hs; /* the unpacked product input (n, in); scratch */
    float *bt;           /* scratch: 2 r max(C, FH, QKV) (B and dB transposed) */
} model_lora;

/* y[:, off:off+out] (row stride ldy) += scale B dropout(x) A' for every
 * targeted slot of product lin of layer l; x (n, in) fp32. */
void model_lora_fwd(const model_lora *lr, int l, int lin, const float *const *A,
                    const float *const *Bm, const float *x, float *y, int ldy, int n);
/* The backward of model_lora_fwd from dy (n, ldy) of the product: dA, dB
 * accumulated (slots with NULL gradients skipped), dx (n, in) += the
 * adapters' input gradient. */
void model_lora_bwd(const model_lora *lr, int l, int lin, const float *const *A,
                    const float *const *Bm, float *const *dA, float *const *dB, const float *x,
                    const float *dy, int ldy, float *dx, int n);
/* y[rows[i], off:off+out] += scale B A' x[rows[i]] for every targeted
 * slot of product lin: the adapter of only some rows of a step (the
 * engine's served adapters; no dropout). Uses lr->xs, hs, bt. */
void model_lora_fwd_rows(const model_lora *lr, int lin, const float *const *A,
                         const float *const *Bm, const float *x, int ldx, float *y, int ldy,
                         const int *rows, int n);

/* A PEFT adapter held apart from its base (the engine's served adapters):
 * cfg is the base's config with the adapter's lora_rank, lora_alpha and
 * lora_targets; a[l * KILN_LORA_MAX_SLOTS + s] (r, in) and b (out, r)
 * fp32, NULL where slot s is not targeted; n_floats in data. */
typedef struct model_adapter {
    kiln_config cfg;
    float *data;
    size_t n_floats;
    const float **a, **b;
} model_adapter;
/* Reads PEFT directory dir for a base of config base (names and shapes
 * checked as kiln_model_load_adapter does). */
kiln_status model_adapter_read(kiln_ctx *ctx, const kiln_config *base, const char *dir,
                               model_adapter *ad);
void model_adapter_free(model_adapter *ad);

/* The rows of a step that one adapter applies to (model_run.groups). */
typedef struct model_lora_group {
    const model_lora *lr;   /* cfg: the adapter's (model_adapter.cfg) */
    const model_adapter *ad;
    const int *rows;
    int n;
} model_lora_group;

/* Freezes the base of a model with adapters (kiln_model_new). */
kiln_status model_lora_finish(kiln_ctx *ctx, kiln_model *m);
/* Whether layer products lin has a targeted slot. */
bool model_lora_has(const kiln_config *c, int lin);

typedef struct model_run {
    const model_lora *lora; /* NULL: no adapters */
    /* the engine's adapters per row group (their rows only; lora NULL):
     * groups share the unpacked-input scratch xu */
    const model_lora_group *groups;
    int n_groups;
    float *xu;
    kern_backend *be;
    const model_shape *s;
    bool qkv_rows;
    void (*attend)(void *ud, int l, const model_blk *io);
    void *ud;
    kiln_model *prof;
} model_run;

/* Layer l's forward; false when the backend ran out of memory. */
bool model_block_fwd(const model_run *r, int l, const model_blk_w *w, int n, const model_blk *io);
/* The final norm of n rows (the architecture's) into the act out, timed
 * as NORM. */
void model_final_norm(const model_run *r, kern_act *out, float *mean, float *rstd,
                      const float *inp, const float *w, const float *b, int n);
model_shape model_shape_of(const kiln_model *m);
/* Layer l's tensors of m, fp32 in the model's layout (read in place). */
model_blk_src model_blk_weights(const kiln_model *m, int l);

/* Reads a config from parsed JSON (what names the source in messages).
 * Used by kiln_config_load and the fuzz harness. */
kiln_status config_from_json(kiln_ctx *ctx, const json_t *o, const char *what,
                             kiln_config *out);
/* The HF config.json object for cfg (caller json_decref's). */
json_t *config_to_json(const kiln_config *cfg);

/* Chooses the kernel tables: ref=true uses the reference kernels and the
 * reference GEMM (tests), false the fast ones (default). */
void model_use_ref_kernels(kiln_model *m, bool ref);
/* Installs backend be (owned by m from now on): its op table, GEMM and,
 * for a bf16 backend, its activation ops (the pass's with bf16
 * activations). Activations of a forward in another backend's layout are
 * dropped. */
void model_use_backend(kiln_model *m, kern_backend *be);

/* The one pass (pass.c): whether m stores bf16 activations (precision
 * bf16 and kiln_precision_opts.bf16_acts), the pass backend, the arena
 * size and carving, and the forward and backward (called by
 * kiln_model_forward/backward after their checks, with m->B, m->T and the
 * tokens set). */
bool model_bf16_acts(const kiln_model *m);
/* The backend whose activation ops the pass runs: m->be for bf16
 * activations, else the f32 backend over m's op table and GEMM. */
kern_backend *model_pass_backend(const kiln_model *m);
size_t model_pass_act_bytes(const kiln_model *m, int B, int T);
void model_pass_carve(kiln_model *m, int B, int T);
kiln_status model_pass_forward(kiln_ctx *ctx, kiln_model *m, float **logits);
/* From dlogits, or (dlogits NULL) from the cross-entropy of the last
 * logits against ce's targets (kiln_model_backward_ce). */
typedef struct model_ce {
    const int32_t *targets;
    const float *mask;
    float grad_scale;
    double *loss_sum, *weight_sum;
} model_ce;
kiln_status model_pass_backward(kiln_ctx *ctx, kiln_model *m, const float *dlogits,
                              const model_ce *ce);

/* Byte size of the activation arena for (B, T). */
size_t model_act_bytes(const kiln_model *m, int B, int T);

/* Loads the weights of model directory dir (model.safetensors, or the
 * shards of model.safetensors.index.json; st_set_open_dir) into m's
 * parameter block (names/shapes checked; F32/BF16/F16 converted). */
kiln_status model_load_weights(kiln_ctx *ctx, kiln_model *m, const char *dir);

/* ---- GGUF (gguf_model.c): kiln's tensors as llama.cpp's ---------------- */

/* How a kiln tensor (HF layout) becomes its GGUF tensor. */
enum {
    MODEL_GGUF_COPY = 0,      /* same bytes */
    MODEL_GGUF_TRANSPOSE = 1, /* gpt2 Conv1D (in, out) -> rows of out */
    MODEL_GGUF_PERMUTE_Q = 2, /* llama q rows: rotate-half -> interleaved */
    MODEL_GGUF_PERMUTE_K = 3  /* llama k rows (KVH heads) */
};

typedef struct model_gguf_tensor {
    char name[GGUF_MAX_NAME]; /* llama.cpp's name: "blk.0.attn_q.weight" */
    int src;                  /* index into m->tensors */
    int op;                   /* MODEL_GGUF_* */
    int n_head;               /* heads of a permuted tensor */
    int layer;                /* block index, -1 for the others */
    int ndim;                 /* 1 or 2 */
    int64_t ne[2];            /* GGUF shape: ne[0] row length, ne[1] rows */
} model_gguf_tensor;

/* Row r of a permuted (MODEL_GGUF_PERMUTE_Q/K) tensor in the GGUF layout
 * comes from row model_gguf_perm_src(r, HS) of the HF one (heads of HS
 * rows: llama.cpp's interleaved rope order against rotate-half). */
int64_t model_gguf_perm_src(int64_t r, int64_t HS);
/* The GGUF tensors of m in kiln's tensor order (tied embeddings: no
 * output.weight). Fills out (may be NULL) and returns the count. */
int model_gguf_tensors(const kiln_model *m, model_gguf_tensor *out);
/* Tensor t in the GGUF layout as fp32: dst has ne[0] * ne[1] floats. */
void model_gguf_get(const kiln_model *m, const model_gguf_tensor *t, float *dst);
/* The inverse: writes src (GGUF layout) into m's parameters. */
void model_gguf_put(kiln_model *m, const model_gguf_tensor *t, const float *src);
/* "gpt2", "llama" or "qwen2" (q/k/v biases without an o bias, llama.cpp's
 * NEOX rope: q/k rows in HF's order, not permuted; a model read from a
 * "llama" file of that layout stays "llama", m->gguf_llama_qk):
 * general.architecture and the hparams' key prefix. */
const char *model_gguf_arch(const kiln_model *m);
/* Writes the {arch}.* hyper-parameter keys llama.cpp reads. */
void model_gguf_write_hparams(gguf_writer *w, const kiln_model *m);
/* The config a GGUF file describes; errors name the key. */
kiln_status model_gguf_config(kiln_ctx *ctx, const gguf_file *f, const char *what,
                              kiln_config *out);
/* Dequantizes f's tensors into m (whose config came from f). */
kiln_status model_gguf_load_weights(kiln_ctx *ctx, kiln_model *m, const gguf_file *f,
                                    const char *what);
/* kiln_model_load of a .gguf file. */
kiln_status model_load_gguf(kiln_ctx *ctx, const char *path, kiln_model **out);

#endif /* KILN_MODEL_H */
