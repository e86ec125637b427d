/*
 * attn_naive.h — the textbook attention in double, for the attention tests
 * (test_attention.c, test_attn_amx.c): scores, causal mask, softmax, P V,
 * and the backward of one query row at a time.
 */
#ifndef KILN_TESTS_ATTN_NAIVE_H
#define KILN_TESTS_ATTN_NAIVE_H

#include <math.h>
#include <stdlib.h>

/* Naive causal attention (GQA, scale 1/sqrt(HS)) in double on qkv (B*T,
 * (NH + 2 KVH) HS). Forward: out (B*T, NH*HS), lse (B, NH, T) and, when Mo
 * is not NULL, Mo = sum_j p_j |v_j| per output element. Backward, when
 * dout is not NULL, from dout and the float out / lse given (what a kernel
 * is fed): dqkv and its magnitude bound M (same layout as qkv). */
static void attn_naive(const float *qkv, const float *dout, const float *outf,
                       const float *lsef, int B, int T, int NH, int KVH, int HS, double *out,
                       double *lse, double *Mo, double *dqkv, double *M)
{
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, grp = NH / KVH;
    double scale = 1.0 / sqrt((double)HS);
    double *s = malloc((size_t)T * sizeof(double));
    size_t nq = (size_t)B * T * S;
    if (dout)
        for (size_t i = 0; i < nq; i++) dqkv[i] = M[i] = 0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int kh = h / grp;
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * S + h * HS;
                double mx = -INFINITY, sum = 0;
                for (int u = 0; u <= t; u++) {
                    const float *k = qkv + ((size_t)b * T + u) * S + (NH + kh) * HS;
                    double dot = 0;
                    for (int i = 0; i < HS; i++) dot += (double)q[i] * k[i];
                    s[u] = dot * scale;
                    mx = fmax(mx, s[u]);
                }
                for (int u = 0; u <= t; u++) sum += exp(s[u] - mx);
                size_t li = ((size_t)b * NH + h) * T + t, oi = ((size_t)b * T + t) * OC + h * HS;
                lse[li] = mx + log(sum);
                for (int i = 0; i < HS; i++) {
                    out[oi + i] = 0;
                    if (Mo) Mo[oi + i] = 0;
                }
                for (int u = 0; u <= t; u++) {
                    const float *v = qkv + ((size_t)b * T + u) * S + (NH + KVH + kh) * HS;
                    double p = exp(s[u] - mx) / sum;
                    for (int i = 0; i < HS; i++) {
                        out[oi + i] += p * v[i];
                        if (Mo) Mo[oi + i] += p * fabs(v[i]);
                    }
                }
                if (!dout) continue;
                /* backward of this query row with the float out and lse */
                const float *dO = dout + oi, *O = outf + oi;
                double D = 0;
                for (int i = 0; i < HS; i++) D += (double)dO[i] * O[i];
                double *dq = dqkv + ((size_t)b * T + t) * S + h * HS;
                double *mq = M + ((size_t)b * T + t) * S + h * HS;
                for (int u = 0; u <= t; u++) {
                    size_t ku = ((size_t)b * T + u) * S + (NH + kh) * HS;
                    size_t vu = ((size_t)b * T + u) * S + (NH + KVH + kh) * HS;
                    const float *k = qkv + ku, *v = qkv + vu;
                    double p = exp(s[u] - (double)lsef[li]), dp = 0, adp = 0;
                    for (int i = 0; i < HS; i++) {
                        dp += (double)dO[i] * v[i];
                        adp += fabs((double)dO[i] * v[i]);
                    }
                    double ds = p * (dp - D) * scale, mds = fabs(ds) + p * scale * adp;
                    for (int i = 0; i < HS; i++) {
                        dqkv[vu + i] += p * dO[i];
                        M[vu + i] += p * fabs(dO[i]);
                        dqkv[ku + i] += ds * q[i];
                        M[ku + i] += mds * fabs(q[i]);
                        dq[i] += ds * k[i];
                        mq[i] += mds * fabs(k[i]);
                    }
                }
            }
        }
    free(s);
}

#endif /* KILN_TESTS_ATTN_NAIVE_H */
