/*
 * attn_doc.c — document-masked ("varlen") causal attention over packed
 * rows: several documents share a row of T positions and each token
 * attends to the tokens of its own document up to itself (a
 * block-diagonal causal mask), as padding-free training does
 * (FlashAttention's varlen kernels over cu_seqlens, HF's position_ids
 * path). A document is a run of positions pos = 0, 1, 2, ...: it starts
 * where pos is 0. Because a document's rows are contiguous in qkv, out
 * and dqkv, the masked attention of a row is exactly the plain causal
 * attention of each document on its own, so these run a table's
 * attention_fwd / attention_bwd once per document (B = 1, T = its
 * length): no work on the masked-out blocks, and the same kernel (ref or
 * fast) as unpacked rows. Only the log-sum-exp, laid out (B, NH, T), is
 * strided differently per document: it goes through scratch (NH * T
 * floats). The splitting is generic (kern_attention_doc_fwd_by: any
 * per-document kernel, e.g. the bf16 backend's AMX attention on bf16 rows);
 * kern_attention_doc_fwd / _bwd run kern_ops' fp32 attention.
 */
#include "kernels/kernels.h"

#include <string.h>

/* Length of the document starting at position t of a row (pos[t] == 0). */
static int doc_len(const int32_t *pos, int t, int T)
{
    int e = t + 1;
    while (e < T && pos[e] != 0) e++;
    return e - t;
}

void kern_attention_doc_fwd_by(kern_doc_fwd_fn fwd, const void *ud, float *out, float *lse,
                               const void *qkv, size_t row_bytes, const int32_t *pos, int B,
                               int T, int NH, int KVH, int HS, float *scratch)
{
    size_t O = (size_t)NH * HS;
    for (int b = 0; b < B; b++) {
        const int32_t *p = pos + (size_t)b * T;
        float *lrow = lse + (size_t)b * NH * T;
        for (int t = 0; t < T;) {
            int n = doc_len(p, t, T);
            size_t r = (size_t)b * T + (size_t)t;
            const void *q = (const char *)qkv + r * row_bytes;
            if (n == T) { /* one document: the row's lse is contiguous */
                fwd(ud, out + r * O, lrow, q, T, NH, KVH, HS);
            } else {
                fwd(ud, out + r * O, scratch, q, n, NH, KVH, HS);
                for (int h = 0; h < NH; h++)
                    memcpy(lrow + (size_t)h * T + t, scratch + (size_t)h * n,
                           (size_t)n * sizeof(float));
            }
            t += n;
        }
    }
}

void kern_attention_doc_bwd_by(kern_doc_bwd_fn bwd, const void *ud, float *dqkv,
                               const float *dout, const void *qkv, size_t row_bytes,
                               const float *out, const float *lse, const int32_t *pos, int B,
                               int T, int NH, int KVH, int HS, float *scratch)
{
    size_t S = (size_t)(NH + 2 * KVH) * HS, O = (size_t)NH * HS;
    for (int b = 0; b < B; b++) {
        const int32_t *p = pos + (size_t)b * T;
        const float *lrow = lse + (size_t)b * NH * T;
        for (int t = 0; t < T;) {
            int n = doc_len(p, t, T);
            size_t r = (size_t)b * T + (size_t)t;
            const float *l = lrow;
            if (n != T) {
                for (int h = 0; h < NH; h++)
                    memcpy(scratch + (size_t)h * n, lrow + (size_t)h * T + t,
                           (size_t)n * sizeof(float));
                l = scratch;
            }
            bwd(ud, dqkv + r * S, dout + r * O, (const char *)qkv + r * row_bytes, out + r * O, l,
                n, NH, KVH, HS);
            t += n;
        }
    }
}

/* kern_ops' fp32 attention as the per-document kernel. */
typedef struct ops_ud {
    const kern_ops *k;
    kern_gemm *g;
} ops_ud;

static void ops_fwd(const void *ud, float *out, float *lse, const void *qkv, int T, int NH,
                    int KVH, int HS)
{
    const ops_ud *u = ud;
    u->k->attention_fwd(u->g, out, lse, qkv, 1, T, NH, KVH, HS);
}

static void ops_bwd(const void *ud, float *dqkv, const float *dout, const void *qkv,
                    const float *out, const float *lse, int T, int NH, int KVH, int HS)
{
    const ops_ud *u = ud;
    u->k->attention_bwd(u->g, dqkv, dout, qkv, out, lse, 1, T, NH, KVH, HS);
}

void kern_attention_doc_fwd(const kern_ops *k, kern_gemm *g, float *out, float *lse,
                            const float *qkv, const int32_t *pos, int B, int T, int NH, int KVH,
                            int HS, float *scratch)
{
    ops_ud u = {k, g};
    kern_attention_doc_fwd_by(ops_fwd, &u, out, lse, qkv,
                              (size_t)(NH + 2 * KVH) * HS * sizeof(float), pos, B, T, NH, KVH, HS,
                              scratch);
}

void kern_attention_doc_bwd(const kern_ops *k, kern_gemm *g, float *dqkv, const float *dout,
                            const float *qkv, const float *out, const float *lse,
                            const int32_t *pos, int B, int T, int NH, int KVH, int HS,
                            float *scratch)
{
    ops_ud u = {k, g};
    kern_attention_doc_bwd_by(ops_bwd, &u, dqkv, dout, qkv,
                              (size_t)(NH + 2 * KVH) * HS * sizeof(float), out, lse, pos, B, T,
                              NH, KVH, HS, scratch);
}

bool kern_doc_pos_ok(const int32_t *pos, int B, int T, int64_t *bad)
{
    for (int64_t i = 0; i < (int64_t)B * T; i++) {
        int32_t want_prev = pos[i] - 1;
        bool start = i % T == 0;
        if (pos[i] < 0 || (start && pos[i] != 0) ||
            (!start && pos[i] != 0 && pos[i - 1] != want_prev)) {
            *bad = i;
            return false;
        }
    }
    return true;
}
