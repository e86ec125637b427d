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
 * floats).
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

void kern_attention_doc_fwd(const kern_ops *k, kern_gemm *g, float *out, float *lse,
                            const float *qkv, const int32_t *pos, int B, int T, int NH, int KVH,
                            int HS, float *scratch)
{
    size_t S = (size_t)(NH + 2 * KVH) * HS, O = (size_t)NH * HS;
    for (int b = 0; b < B; b++) {
        const int32_t *p = pos + (size_t)b * T;
        float *lrow = lse + (size_t)b * NH * T;
        for (int t = 0; t < T;) {
            int n = doc_len(p, t, T);
            size_t r = (size_t)b * T + (size_t)t;
            if (n == T) { /* one document: the row's lse is contiguous */
                k->attention_fwd(g, out + r * O, lrow, qkv + r * S, 1, T, NH, KVH, HS);
            } else {
                k->attention_fwd(g, out + r * O, scratch, qkv + r * S, 1, n, NH, KVH, HS);
                for (int h = 0; h < NH; h++)
                    memcpy(lrow + (size_t)h * T + t, scratch + (size_t)h * n,
                           (size_t)n * sizeof(float));
            }
            t += n;
        }
    }
}

void kern_attention_doc_bwd(const kern_ops *k, kern_gemm *g, float *dqkv, const float *dout,
                            const float *qkv, const float *out, const float *lse,
                            const int32_t *pos, int B, int T, int NH, int KVH, int HS,
                            float *scratch)
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
            k->attention_bwd(g, dqkv + r * S, dout + r * O, qkv + r * S, out + r * O, l, 1, n, NH,
                             KVH, HS);
            t += n;
        }
    }
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
