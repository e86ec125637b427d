/*
 * kernels.h — the compute kernels of the model (kernels layer, private).
 *
 * Two implementations of every op sit behind one table (kern_ops):
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

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

/* Generic linear-layer implementations on top of kern_gemm (used by both
 * tables; bias handling is single-threaded in ref, threaded in fast). */
void kern_matmul_fwd_gemm(kern_gemm *g, float *out, const float *inp,
                          const float *w, const float *b, int N, int C,
                          int OC, kern_wlayout lay);
void kern_matmul_bwd_gemm(kern_gemm *g, float *dinp, float *dw, float *db,
                          const float *dout, const float *inp,
                          const float *w, int N, int C, int OC,
                          kern_wlayout lay, bool dinp_acc);

/* The FLOP count of the model's matrix products is documented in
 * docs/performance.md; kernels do not count. */

#endif /* KILN_KERNELS_H */
