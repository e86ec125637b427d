/*
 * kernels.h — the compute kernels of the model (kernels layer, private):
 * the one header of this layer that other layers include. A backend
 * (kern_backend, below) carries buffers, prepared weights, the fp32 op
 * table and the bf16 path's ops; its folder (kernels/ref, kernels/x86,
 * kernels/onednn) is its private business (docs/architecture.md).
 *
 * Two implementations of every fp32 op sit behind one table (kern_ops):
 *   ref  (kernels/ref)  plain C, one thread, written for clarity: the oracle
 *   fast (kernels/x86 + kernels/onednn)  OpenMP, AVX-512 where it pays,
 *        matrix products through oneDNN when the build has it
 * tests/test_kernels.c runs every op through both tables and compares.
 *
 * Every matrix product of the model goes through kern_gemm, one small
 * interface (row-major sgemm). The linear layers use kern_matmul_fwd/bwd,
 * which are built on it:
 *     out(N,OC)  = inp(N,C) @ W^T + b          W (OC,C)  nn.Linear layout
 *                  inp(N,C) @ W   + b          W (C,OC)  HF Conv1D layout
 *     dinp(N,C)  (+)= dout(N,OC) @ W
 *     dW         += dout^T @ inp  (layout of W)
 *     db(OC)     += sum_n dout(n, :)
 * A mixed-precision backend (bf16/fp16, AMX) plugs in by providing another
 * kern_gemm (or by overriding matmul_fwd / matmul_bwd in a kern_ops copy).
 *
 * Determinism: no kernel depends on the order in which threads finish;
 * reductions are split by output element or by fixed partitions, so the
 * same inputs and thread count give bit-identical outputs.
 */
#ifndef KILN_KERNELS_H
#define KILN_KERNELS_H

#include "tensor/tensor.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tensor/tensor.h"

/* ---- the CPU ---------------------------------------------------------- */

/* AVX-512 (F/BW/VL) is usable here: the CPU has it and the OS saves its
 * state (false on other architectures). Detected once. */
bool kern_cpu_avx512(void);

/* ---- matrix products ------------------------------------------------- */

typedef struct kern_gemm kern_gemm;
/* C(M,N) = alpha * op(A)(M,K) @ op(B)(K,N) + beta * C, row-major, with
 * op(X) = X^T when the trans flag is set (then X is stored (K,M) / (N,K)).
 * lda/ldb/ldc are row strides in elements. beta == 0 ignores C's contents
 * (NaN in C does not propagate). */
typedef void (*kern_gemm_fn)(kern_gemm *g, bool ta, bool tb, int M, int N,
                             int K, float alpha, const float *A, int lda,
                             const float *B, int ldb, float beta, float *C,
                             int ldc);
struct kern_gemm {
    const char *name; /* "ref", "onednn", "avx512" ... */
    kern_gemm_fn gemm;
    void (*destroy)(kern_gemm *g); /* frees g (may be NULL for static) */
    void *state;                   /* backend caches */
    /* The weights may have changed (called by the model at the start of
     * every forward pass): backends that cache converted weights (mixed
     * precision, kernels/x86/bf16_ops.c) drop them. May be NULL. */
    void (*invalidate)(kern_gemm *g);
};

/* kern_gemm objects need not be thread-safe (backends keep caches and
 * scratch): call one from one thread at a time. kern_gemm_threadsafe() is
 * a stateless fp32 GEMM callable from inside an OpenMP parallel region
 * (oneDNN's sgemm, which runs single-threaded there; else a plain loop);
 * the attention kernels no longer use it (they tile their own products). */
kern_gemm *kern_gemm_threadsafe(void);

/* The portable reference GEMM (static object; destroy is NULL). */
kern_gemm *kern_gemm_ref(void);
/* The fastest GEMM this build has (oneDNN when present, else an OpenMP
 * blocked C kernel). Heap object: free with kern_gemm_free. NULL on OOM. */
kern_gemm *kern_gemm_fast_new(void);
void kern_gemm_free(kern_gemm *g);

/* Weight layouts of linear layers. */
typedef enum kern_wlayout {
    KERN_W_OUT_IN = 0, /* W (OC, C): nn.Linear (llama) */
    KERN_W_IN_OUT = 1  /* W (C, OC): HF Conv1D (gpt2) */
} kern_wlayout;

/* A typed weight matrix as the ops read it: rows = outputs, cols =
 * inputs (y = W x), in the given storage layout. KILN_DTYPE_F32 in either
 * layout (the model's own tensors, read in place); KILN_DTYPE_BF16 in
 * KERN_W_OUT_IN only (rows of bf16 streamed by decode). The quantized
 * dtypes of tensor.h plug in here. */
typedef struct kern_wt {
    kiln_dtype dtype;
    kern_wlayout lay;
    int rows, cols;
    const void *data;
} kern_wt;

/* With AVX512_BF16 (in the build's target), bf16 weights are dotted with
 * activations rounded to bf16 (products exact in fp32, sums in fp32) at
 * decode sizes, as bf16 hardware does; without it, and at prefill sizes
 * (the GEMM), the weights are widened and the activations stay fp32. The
 * reference linear follows the same rule, so the two agree to fp32
 * rounding. */
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define KERN_BF16_DOT 1
#else
#define KERN_BF16_DOT 0
#endif

/* From this many rows on, a linear is "prefill-sized" (kern_ops.linear). */
#define KERN_GEMM_MIN_T 16

/* Prepares src (fp32, either layout) as dtype dt for the linear op (fp32:
 * a copy in the same layout; bf16: rows (out, in)); out owns the memory
 * (kern_weight_free). false when out of memory. */
bool kern_weight_prepare(kiln_dtype dt, const kern_wt *src, kern_wt *out);
void kern_weight_free(kern_wt *w);
/* The dtype a weight of rows of `cols` inputs is prepared as when dt is
 * asked: dt itself, or, for a Q type whose block does not divide the
 * rows (K-quants need multiples of 256), Q8_0 (multiples of 32) or else
 * BF16, as llama.cpp falls back. */
kiln_dtype kern_weight_dtype(kiln_dtype dt, int cols);

/* Activations for the Q types' dot products: each row of K inputs (K a
 * multiple of 32) in blocks of 32 as int8 q (round to nearest of x *
 * 127/amax) with fp32 scale d = amax/127, and the sums of q over each half
 * block (s16, two per block: the Q4/Q6 offsets). Every backend quantizes
 * activations with this one function, so they dot the same integers. */
void kern_quant_act(const float *x, int K, int8_t *q, float *d, int32_t *s16);
/* The reference dot product of one row of Q-type weights (K inputs) with
 * one quantized activation row: integer sums per block, scaled and summed
 * in double. */
double kern_qdot_ref(kiln_dtype t, const void *row, int K, const int8_t *q, const float *d,
                     const int32_t *s16);

/* ---- the op table ---------------------------------------------------- */

typedef struct kern_ops {
    const char *name;

    /* Linear layer. b may be NULL. */
    void (*matmul_fwd)(kern_gemm *g, float *out, const float *inp,
                       const float *w, const float *b, int N, int C, int OC,
                       kern_wlayout lay);
    /* dinp (may be NULL) is overwritten, or accumulated when dinp_acc;
     * dw and db (may be NULL) are accumulated. */
    void (*matmul_bwd)(kern_gemm *g, float *dinp, float *dw, float *db,
                       const float *dout, const float *inp, const float *w,
                       int N, int C, int OC, kern_wlayout lay, bool dinp_acc);

    /* out = wte[tok] + wpe[t] (wpe may be NULL: RoPE models). tokens are
     * assumed in range (the model checks them). */
    void (*embed_fwd)(float *out, const int32_t *tok, const float *wte,
                      const float *wpe, int B, int T, int C);
    /* dwte[tok] += dout, dwpe[t] += dout (either may be NULL: a frozen
     * tensor's gradient is not computed). */
    void (*embed_bwd)(float *dwte, float *dwpe, const float *dout,
                      const int32_t *tok, int B, int T, int C, int V);

    /* LayerNorm over rows of C. mean/rstd (N) saved for backward. */
    void (*layernorm_fwd)(float *out, float *mean, float *rstd,
                          const float *inp, const float *w, const float *b,
                          int N, int C, float eps);
    /* dinp, dw, db accumulated (dw and db may be NULL). */
    void (*layernorm_bwd)(float *dinp, float *dw, float *db,
                          const float *dout, const float *inp, const float *w,
                          const float *mean, const float *rstd, int N, int C);
    /* RMSNorm (HF llama): out = inp * rstd * w. */
    void (*rmsnorm_fwd)(float *out, float *rstd, const float *inp,
                        const float *w, int N, int C, float eps);
    void (*rmsnorm_bwd)(float *dinp, float *dw, const float *dout,
                        const float *inp, const float *w, const float *rstd,
                        int N, int C);

    /* GELU, tanh approximation (HF "gelu_new"). dinp is overwritten. */
    void (*gelu_fwd)(float *out, const float *inp, size_t n);
    void (*gelu_bwd)(float *dinp, const float *inp, const float *dout,
                     size_t n);
    /* SwiGLU: inp (N, 2F) = [gate | up] per row; out (N, F) =
     * silu(gate) * up. dinp (N, 2F) is overwritten. */
    void (*swiglu_fwd)(float *out, const float *inp, int N, int F);
    void (*swiglu_bwd)(float *dinp, const float *inp, const float *dout,
                       int N, int F);

    /* Rotary embedding (HF rotate_half), in place on the q and k heads of
     * qkv (B*T, (NH + 2*KVH) * HS). cos/sin tables are (T, HS/2).
     * inverse=true applies the transpose rotation (the backward pass). */
    void (*rope)(float *qkv, const float *cos_t, const float *sin_t, int B,
                 int T, int NH, int KVH, int HS, bool inverse);

    /* Causal self-attention with GQA, flash style: no (T, T) matrix is
     * stored. qkv (B*T, (NH + 2*KVH)*HS): q heads, then k heads, then v
     * heads; query head h uses kv head h / (NH/KVH). Scale 1/sqrt(HS).
     * out (B*T, NH*HS); lse (B, NH, T) the log-sum-exp of each query row's
     * scaled scores (over keys t2 <= t), which is all the backward needs to
     * recompute the softmax probabilities P = exp(scale q k^T - lse).
     * g is the model's GEMM (unused: ref loops row by row, fast tiles the
     * products itself on per-thread tiles, OpenMP over heads). */
    void (*attention_fwd)(kern_gemm *g, float *out, float *lse,
                          const float *qkv, int B, int T, int NH, int KVH,
                          int HS);
    /* dqkv is overwritten. out and lse are the forward's; D = rowsum(dout *
     * out) is computed inside. Deterministic for a given thread count (the
     * dk/dv of a kv head are summed by one task in a fixed order). */
    void (*attention_bwd)(kern_gemm *g, float *dqkv, const float *dout,
                          const float *qkv, const float *out,
                          const float *lse, int B, int T, int NH, int KVH,
                          int HS);

    /* Inference linear layer on a typed weight: Y (T, W->rows) = X (T,
     * W->cols) W^T + b (b may be NULL), overwritten. The backend picks the
     * kernel by shape: a decode-sized T (< KERN_GEMM_MIN_T) streams each
     * weight row once for all T rows (the memory-bound case); a
     * prefill-sized T is a GEMM on g: fp32 weights by the same call as
     * matmul_fwd (so a prefill and the training forward give the same
     * bits), bf16 and block-quantized weights widened / dequantized to
     * fp32 a tile of rows at a time, the activations fp32. At decode
     * sizes, with AVX512_BF16, bf16 weights are dotted with activations
     * rounded to bf16 (exact products, fp32 sums), as bf16 hardware does;
     * block-quantized weights (Q8_0, Q4_0, Q4_K, Q6_K) with activations
     * quantized to 8 bits per block of 32 (kern_quant_act), dotted in
     * integers. Every backend, ref included, follows these rules. */
    void (*linear)(kern_gemm *g, float *Y, const float *X, int T, const kern_wt *W,
                   const float *b);

    /* Rotary embedding of n rows at explicit positions: row i (stride
     * floats apart) holds nheads heads of HS, rotated by position pos[i]
     * (the same arithmetic as rope at t = pos[i]). */
    void (*rope_at)(float *x, int n, size_t stride, const int *pos, const float *cos_t,
                    const float *sin_t, int nheads, int HS);

    /* Attention of T query rows against a KV cache (inference). Row t's
     * query heads are qkv + t * qkv_stride (NH heads of HS); it attends to
     * positions 0..pos[t] of its slot's cache, whose keys and values for
     * that position are already written: key j of slot s, kv head h is
     * kc + s * slot_stride + j * KVH*HS + h*HS (vc alike). out (T, NH*HS).
     * scores: scratch of T * NH * n_ctx floats. Scale 1/sqrt(HS). */
    void (*attention_kv)(float *out, const float *qkv, size_t qkv_stride, int T,
                         const int *slot, const int *pos, const float *kc, const float *vc,
                         size_t slot_stride, int NH, int KVH, int HS, int n_ctx,
                         float *scores);

    /* out = a + b (out may alias a or b). */
    void (*add)(float *out, const float *a, const float *b, size_t n);

    /* Fused softmax + cross-entropy (see kiln_cross_entropy). Rows with
     * target < 0 contribute nothing (their dlogits row is zeroed). Adds
     * the mask-weighted loss and weight to *loss_sum / *weight_sum, summed
     * in a fixed order (deterministic for a given thread count). dlogits
     * may alias logits or be NULL. */
    void (*cross_entropy)(const float *logits, const int32_t *targets,
                          const float *mask, int64_t N, int V,
                          float grad_scale, float *dlogits, double *loss_sum,
                          double *weight_sum);
} kern_ops;

/* The reference table and the fast table (the same functions as ref where
 * no faster version exists). Static, immutable. */
const kern_ops *kern_ops_ref(void);
const kern_ops *kern_ops_fast(void);

/* The fast table's LayerNorm (rms false: mean, rstd; b may be NULL) or
 * RMSNorm (rms true: rstd only; mean and b unused) forward of N rows of C
 * with the output written as packed bf16 only (kernels/x86/bf16.h's
 * packed-A layout: K = C padded to 32, rows padded to a multiple of 32,
 * padding zero): bit for bit mp_pack_a of that table's fp32 output,
 * without the fp32 output. */
void kern_fast_norm_fwd_packed(uint16_t *outp, float *mean, float *rstd, const float *inp,
                               const float *w, const float *b, int N, int C, float eps, bool rms);

/* The fast table's cross-entropy (the same loss and gradient values as
 * its cross_entropy; the loss summed per 32 rows, then in row-block order)
 * with the gradient written only as mp_pack_dy would pack it (pa, pt in
 * the tok form or not; kernels/x86/bf16.h), never as fp32 rows: for the
 * LM head's backward of the bf16 path. */
void kern_fast_ce_packed(uint16_t *pa, uint16_t *pt, bool tok, const float *logits,
                         const int32_t *targets, const float *mask, int N, int V,
                         float grad_scale, double *loss_sum, double *weight_sum);

/* The fast table's attention (attn_fast.c): its attention_fwd and
 * attention_bwd entries. */
void kern_fast_attention_fwd(kern_gemm *g, float *out, float *lse, const float *qkv, int B, int T,
                             int NH, int KVH, int HS);
void kern_fast_attention_bwd(kern_gemm *g, float *dqkv, const float *dout, const float *qkv,
                             const float *out, const float *lse, int B, int T, int NH, int KVH,
                             int HS);

/* Document-masked causal attention over packed rows (attn_doc.c): pos
 * (B, T) is each token's position inside its document (a document starts
 * where pos is 0 and runs 0, 1, 2, ...); a token attends to the tokens of
 * its document up to itself (block-diagonal causal mask). Contracts as
 * k's attention_fwd / attention_bwd (the same layouts of qkv, out, lse,
 * dqkv), run once per document on k. scratch: NH * T floats. */
void kern_attention_doc_fwd(const kern_ops *k, kern_gemm *g, float *out, float *lse,
                            const float *qkv, const int32_t *pos, int B, int T, int NH, int KVH,
                            int HS, float *scratch);
void kern_attention_doc_bwd(const kern_ops *k, kern_gemm *g, float *dqkv, const float *dout,
                            const float *qkv, const float *out, const float *lse,
                            const int32_t *pos, int B, int T, int NH, int KVH, int HS,
                            float *scratch);
/* The same over any per-document kernel: fwd / bwd run one document of T
 * rows (B = 1) with the contracts above, qkv being rows of row_bytes (fp32
 * or a compute dtype's), out, dout and dqkv fp32 rows. */
typedef void (*kern_doc_fwd_fn)(const void *ud, float *out, float *lse, const void *qkv, int T,
                                int NH, int KVH, int HS);
typedef void (*kern_doc_bwd_fn)(const void *ud, float *dqkv, const float *dout, const void *qkv,
                                const float *out, const float *lse, int T, int NH, int KVH,
                                int HS);
void kern_attention_doc_fwd_by(kern_doc_fwd_fn fwd, const void *ud, float *out, float *lse,
                               const void *qkv, size_t row_bytes, const int32_t *pos, int B,
                               int T, int NH, int KVH, int HS, float *scratch);
void kern_attention_doc_bwd_by(kern_doc_bwd_fn bwd, const void *ud, float *dqkv,
                               const float *dout, const void *qkv, size_t row_bytes,
                               const float *out, const float *lse, const int32_t *pos, int B,
                               int T, int NH, int KVH, int HS, float *scratch);
/* Whether pos (B, T) is a valid document layout: each row starts at 0 and
 * every position is 0 or its predecessor + 1; else the first bad index in
 * *bad. */
bool kern_doc_pos_ok(const int32_t *pos, int B, int T, int64_t *bad);

/* The fast table's inference ops (x86/linear_stream.c). */
void kern_fast_linear(kern_gemm *g, float *Y, const float *X, int T, const kern_wt *W,
                      const float *b);
/* Block-quantized weights (x86/linear_quant.c); false when this build has
 * no AVX512-VNNI kernel or memory ran out (the caller runs ref). */
bool kern_fast_linear_q(float *Y, const float *X, int T, const kern_wt *W, const float *b);
void kern_fast_rope_at(float *x, int n, size_t stride, const int *pos, const float *cos_t,
                       const float *sin_t, int nheads, int HS);
void kern_fast_attention_kv(float *out, const float *qkv, size_t qkv_stride, int T,
                            const int *slot, const int *pos, const float *kc, const float *vc,
                            size_t slot_stride, int NH, int KVH, int HS, int n_ctx,
                            float *scores);

/* Generic linear-layer implementations on top of kern_gemm (used by both
 * tables; bias handling is single-threaded in ref, threaded in fast). */
void kern_matmul_fwd_gemm(kern_gemm *g, float *out, const float *inp,
                          const float *w, const float *b, int N, int C,
                          int OC, kern_wlayout lay);
void kern_matmul_bwd_gemm(kern_gemm *g, float *dinp, float *dw, float *db,
                          const float *dout, const float *inp,
                          const float *w, int N, int C, int OC,
                          kern_wlayout lay, bool dinp_acc);

/* Streaming read of n bytes on nth threads (0 = all): the bandwidth
 * roofline of decode (bench_decode). Returns a checksum so that the read
 * cannot be optimised away. */
double kern_stream_read(const void *p, size_t n, int nth);

/* ---- backends ----------------------------------------------------------
 *
 * A backend is one vtable (kern_backend) carrying everything the model
 * needs from a compute device: buffers, weights prepared once in the
 * backend's own layout, the fp32 op table (kern_ops) and the ops of the
 * mixed-precision training path on opaque handles (kern_mp_ops). Packed
 * layouts, weight caches, CPU features and scratch are the backend's
 * private business; the model includes this header only.
 *   ref  (kernels/ref/backend_ref.c)  portable C, plain row-major bf16
 *        layouts, one thread: the oracle tests compare every backend to
 *   cpu  (kernels/x86/backend_cpu.c)  oneDNN, AVX-512, AVX512_BF16, AMX
 *        (chosen at run time by CPUID, or forced by the kernel option)
 * tests/test_backend_ops.c runs every op of every backend against ref.
 * docs/architecture.md says how to add an op or a backend (cuda/). */

typedef struct kern_backend kern_backend;
/* A weight matrix prepared by a backend (converted / packed / uploaded):
 * opaque, owned by the backend, valid until the backend is freed. */
typedef struct kern_weight kern_weight;
/* An activation (rows, cols) stored in the backend's compute dtype and
 * layout: opaque bytes, kern_mp_ops.act_bytes(rows, cols) of them, in
 * memory the caller provides (the model's activation arena). */
typedef struct kern_act kern_act;

/* Activation functions of the MLP (the values of the x86 MP_ACT_*). */
enum { KERN_ACT_NONE = 0, KERN_ACT_GELU = 1, KERN_ACT_SWIGLU = 2 };

/* Where the product of kern_mp_ops.linear_fwd goes (y = x W' + bias). */
typedef enum kern_out_kind {
    KERN_OUT_F32 = 0,  /* y (N, OC) fp32 rows */
    KERN_OUT_RES = 1,  /* y = res + product, fp32 (y may be res) */
    KERN_OUT_ROWS = 2, /* rows = bf16(product) as plain rows (N, OC) */
    KERN_OUT_GELU = 3  /* hp = bf16(product), ap = bf16(gelu(bf16(product))) */
} kern_out_kind;
typedef struct kern_out {
    kern_out_kind kind;
    float *y;           /* F32, RES */
    const float *res;   /* RES */
    void *rows;         /* ROWS (rows in the compute dtype: mp.row_size) */
    kern_act *hp, *ap;  /* GELU */
} kern_out;

/* The activation ops of the model's one forward and backward pass
 * (model/pass.c), in the backend's compute dtype: bf16 compute with
 * fp32 accumulation (ref, cpu), or fp32 (the f32 backend, below).
 * Activations that are inputs of products are kern_act in the backend's
 * layout; "rows" are plain rows of the compute dtype (bf16: tensor.h's
 * f32_to_bf16; row_size bytes each); everything else is fp32 host rows. The
 * ops returning bool return false on out of memory (nothing is then
 * promised about their outputs). N rows of tokens throughout; weights are
 * prepared with weight_prepare (OC, C, layout). */
typedef struct kern_mp_ops {
    /* Bytes of one element of "rows" (2: bf16; 4: the f32 backend). */
    size_t row_size;
    /* Bytes of a kern_act of (rows, cols). */
    size_t (*act_bytes)(const kern_backend *b, int rows, int cols);
    /* dst = bf16(x) for x (rows, cols) fp32; and back (exact). */
    void (*act_pack)(const kern_backend *b, kern_act *dst, const float *x, int rows, int cols);
    void (*act_unpack)(const kern_backend *b, float *x, const kern_act *src, int rows, int cols);
    /* Plain bf16 rows <-> fp32, n elements. */
    void (*to_rows)(const kern_backend *b, void *dst, const float *x, size_t n);
    void (*from_rows)(const kern_backend *b, float *dst, const void *x, size_t n);
    /* LayerNorm (rms false: mean, rstd; b may be NULL) or RMSNorm (rms
     * true: rstd only) of N rows of C, the output written only as outp =
     * bf16(the fp32 norm output of kern_ops.layernorm_fwd / rmsnorm_fwd). */
    void (*norm_fwd)(const kern_backend *b, kern_act *outp, float *mean, float *rstd,
                     const float *inp, const float *w, const float *bias, int N, int C,
                     float eps, bool rms);
    /* The product x (N, C) W' (+ bias (OC), may be NULL) of a prepared
     * weight (OC, C), stored as o says. */
    bool (*linear_fwd)(kern_backend *b, const kern_out *o, const kern_act *x, kern_weight *w,
                       const float *bias, int N);
    /* The MLP activation from fp32 h (N, FH) (FH = F; 2F = gate|up for
     * SwiGLU): hp = bf16(h) (N, FH), ap = bf16(act(bf16(h))) (N, F). */
    void (*act_fwd)(const kern_backend *b, kern_act *hp, kern_act *ap, const float *h, int N,
                    int F, int act);
    /* dh (N, FH) = act'(hp) * dout (N, F), overwritten. */
    void (*act_bwd)(const kern_backend *b, float *dh, const kern_act *hp, const float *dout,
                    int N, int F, int act);
    /* The backward of y = a W' + bias with a = act(x) (x (N, C) for act
     * NONE; the pre-activation (N, C) / (N, 2C) for GELU / SWIGLU, a then
     * bf16(act(x))): dW (+)= the weight gradient in W's layout (= when
     * !dw_acc: dW's old contents not read), db += column sums of dy (NULL:
     * none), dx (N, C) = dy W (overwritten). */
    bool (*linear_bwd)(kern_backend *b, kern_weight *w, const float *dy, const kern_act *x,
                       int act, int N, float *dW, bool dw_acc, float *db, float *dx);
    /* The backward of the MLP y = gelu(x W1' + b1) W2' + b2 (act NONE or
     * GELU) from x and its pre-activation h: the gradient of h is
     * dact(bf16(dy) W2) * act'(h) (never needed in fp32 outside). Weight
     * and bias gradients as linear_bwd; dx overwritten. */
    bool (*mlp_bwd)(kern_backend *b, kern_weight *w1, kern_weight *w2, const float *dy,
                    const kern_act *x, const kern_act *h, int act, int N, float *dW1, float *db1,
                    float *dW2, float *db2, float *dx, bool dw_acc);
    /* Cross-entropy of logits (N, V) (kern_ops.cross_entropy's contract:
     * loss and weight sums added) fused with the LM head's backward: its
     * gradient goes to linear_bwd(w, ., x, NONE, dW, dw_acc, no bias, dx)
     * without a second (N, V) buffer: never stored as fp32 rows (bf16
     * backends), or written over the logits (the f32 backend: the logits
     * are the backend's to overwrite). */
    bool (*ce_linear_bwd)(kern_backend *b, kern_weight *w, float *logits,
                          const int32_t *targets, const float *mask, int N, int V,
                          float grad_scale, double *loss_sum, double *weight_sum,
                          const kern_act *x, float *dW, bool dw_acc, float *dx);
    /* Whether attention runs in the compute dtype for head size HS and
     * sequence length T (else the model runs kern_ops' fp32 attention on
     * bf16-rounded values). */
    bool (*attention_ok)(const kern_backend *b, int HS, int T);
    /* Causal GQA attention (kern_ops.attention_fwd's contract) from bf16
     * rows qkvh (B*T, (NH+2*KVH)*HS); the output written as outp (B*T,
     * NH*HS) only. P is a bf16 product operand (torch.autocast's error). */
    void (*attention_fwd)(const kern_backend *b, kern_act *outp, float *lse,
                          const void *qkvh, int B, int T, int NH, int KVH, int HS);
    /* Its backward: dqkv (B*T, QKV) overwritten, from the forward's outp
     * and lse; dout, P and dS are bf16 product operands. */
    void (*attention_bwd)(const kern_backend *b, float *dqkv, const float *dout,
                          const void *qkvh, const kern_act *outp, const float *lse, int B,
                          int T, int NH, int KVH, int HS);
    /* attention_bwd followed by linear_bwd of the qkv layer (w, input x,
     * no activation, bias gradient db): the same results, with the
     * gradient of qkv not stored as fp32 rows where the backend can
     * (dqkv: fp32 scratch of (B*T, QKV) for where it cannot). */
    bool (*attention_linear_bwd)(kern_backend *b, kern_weight *w, float *dqkv,
                                 const float *dout, const void *qkvh, const kern_act *outp,
                                 const float *lse, int B, int T, int NH, int KVH, int HS,
                                 const kern_act *x, float *dW, bool dw_acc, float *db, float *dx);
    /* Document-masked attention (kern_attention_doc_fwd's contract: pos,
     * scratch of NH * T floats) in the compute dtype from the rows qkvh,
     * the output as fp32 rows (B*T, NH*HS); the backward from those rows
     * (dqkv overwritten). Called where attention_ok; NULL where the backend
     * has none (the model then runs kern_ops' attention by document on the
     * widened values). */
    void (*attention_doc_fwd)(const kern_backend *b, float *out, float *lse, const void *qkvh,
                              const int32_t *pos, int B, int T, int NH, int KVH, int HS,
                              float *scratch);
    void (*attention_doc_bwd)(const kern_backend *b, float *dqkv, const float *dout,
                              const void *qkvh, const float *out, const float *lse,
                              const int32_t *pos, int B, int T, int NH, int KVH, int HS,
                              float *scratch);
} kern_mp_ops;

struct kern_backend {
    const char *name;   /* "ref", "cpu" */
    const char *kernel; /* the products' kernel: "ref", "avx512_bf16", "amx_bf16" */
    kiln_dtype dtype;   /* compute dtype of the products: F32, BF16 or F16 */
    void *state;        /* the backend's */

    /* The fp32 op table, linear layers in the compute dtype (kern_ops's
     * layout is stable: other ops are added at its end), and the GEMM the
     * ops take (the backend's; kern_gemm.invalidate starts a new weight
     * epoch: the model calls it at the start of every forward). */
    const kern_ops *ops;
    kern_gemm *gemm;

    /* Buffers: memory of the backend's device (host memory for ref and
     * cpu; a cuda/ backend returns device memory). alloc: NULL on OOM;
     * free(NULL) is a no-op; set / get copy n bytes between host memory
     * and offset off of the buffer. */
    void *(*buf_alloc)(kern_backend *b, size_t bytes);
    void (*buf_free)(kern_backend *b, void *buf);
    void (*buf_set)(kern_backend *b, void *buf, size_t off, const void *src, size_t n);
    void (*buf_get)(kern_backend *b, const void *buf, size_t off, void *dst, size_t n);

    /* Weights. weight_prepare: the handle of fp32 weight w (OC, C) in
     * layout lay (the same handle for the same arguments; NULL on OOM).
     * The backend keeps its converted copies current: they follow w's
     * values as of the start of the epoch in which an op reads them
     * (converted at most once per epoch), unless weight_refresh has
     * already written them for the next epoch. weight_refresh_rows: the
     * rows per strip (rows of w as stored: C when lay is IN_OUT, else OC)
     * that weight_refresh takes (0: none; the next epoch converts w
     * whole). weight_refresh(r0): rows r0 .. r0 + strip - 1 of w, just
     * updated by an optimizer, converted into every copy (thread-safe for
     * disjoint strips); after all strips, weight_fresh marks the copies
     * current for the next epoch. */
    kern_weight *(*weight_prepare)(kern_backend *b, const float *w, int OC, int C,
                                   kern_wlayout lay);
    int (*weight_refresh_rows)(const kern_backend *b, const kern_weight *w);
    void (*weight_refresh)(kern_backend *b, kern_weight *w, int r0);
    void (*weight_fresh)(kern_backend *b, kern_weight *w);
    /* The weight did not change this step (a frozen tensor): copies
     * current now stay current in the next epoch (nothing is converted). */
    void (*weight_keep)(kern_backend *b, kern_weight *w);

    /* The bf16 training path's ops (dtype BF16; NULL entries elsewhere). */
    kern_mp_ops mp;

    void (*destroy)(kern_backend *b);
};

/* The backends: "ref" and "cpu", for compute dtype dt (KILN_DTYPE_BF16
 * or KILN_DTYPE_F16, ref: BF16 only; KILN_DTYPE_F32: the f32 backend over
 * kern_ops_ref / kern_ops_fast) with the product kernel k (kiln.h's
 * kiln_bf16_kernel; cpu: AUTO = the best this CPU has, a kernel it cannot
 * run also falls back to the best; ref ignores it). NULL on OOM or for an
 * unknown name / unsupported dtype. Free with kern_backend_free. */
kern_backend *kern_backend_new(const char *name, kiln_dtype dt, kiln_bf16_kernel k);
kern_backend *kern_backend_ref_new(kiln_dtype dt);
kern_backend *kern_backend_cpu_new(kiln_dtype dt, kiln_bf16_kernel k);
/* The f32 backend (kernels/acts_f32.c): the activation ops (mp) with fp32
 * activations over the fp32 op table ops and GEMM gemm (freed with the
 * backend when own_gemm; else the caller's, who may swap b->ops / b->gemm
 * between passes: fp16 and bf16 with fp32 activations put their
 * mixed-precision GEMM here). Its products
 * are ops->matmul_fwd / matmul_bwd, bit for bit the table's; with stream
 * (inference) the forward product is ops->linear on typed weights. Its
 * weight handles are kern_wt (weight_prepare: the fp32 tensor in place;
 * kern_f32_weight: any typed weight the engine prepared). NULL on OOM. */
kern_backend *kern_backend_f32_new(const kern_ops *ops, kern_gemm *gemm, bool own_gemm,
                                   bool stream);
kern_weight *kern_f32_weight(const kern_wt *w);
/* The buffers of a backend whose device is the host (ref, cpu, f32):
 * 64-byte aligned host memory, copies by memcpy. */
void *kern_host_buf_alloc(kern_backend *b, size_t bytes);
void kern_host_buf_free(kern_backend *b, void *buf);
void kern_host_buf_set(kern_backend *b, void *buf, size_t off, const void *src, size_t n);
void kern_host_buf_get(kern_backend *b, const void *buf, size_t off, void *dst, size_t n);
void kern_backend_free(kern_backend *b);
/* The kernel a cpu backend runs (resolved, never AUTO); AUTO for other
 * backends. */
kiln_bf16_kernel kern_backend_kernel(const kern_backend *b);

/* The CPU has bf16 products in hardware (AMX-BF16 usable or
 * AVX512_BF16), and a one-line description of its mixed-precision
 * features and the kernel AUTO picks. */
bool kern_cpu_bf16(void);
void kern_cpu_describe(char *buf, size_t cap);

/* The FLOP count of the model's matrix products is documented in
 * docs/performance.md; kernels do not count. */

#endif /* KILN_KERNELS_H */
